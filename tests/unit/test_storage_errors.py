"""A filesystem's refusal, whichever library raised it, becomes one StorageError line; anything else stays
itself."""

import errno

from lora_core.errors import StorageError, storage_error


def test_full_disk_from_python_and_from_rust_libraries(tmp_path):
    python = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))
    safetensors = RuntimeError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
    )
    tokenizers = Exception("No space left on device (os error 28)")
    for exc in (python, safetensors, tokenizers):
        err = storage_error(exc, tmp_path)
        assert isinstance(err, StorageError) and str(err).startswith("no space left on device writing ")
        assert "free there now" in str(err) and "run the same command" in str(err) and "\n" not in str(err)
    assert f"writing {tmp_path / 'model.safetensors'} (" in str(storage_error(python, "elsewhere"))


def test_found_anywhere_in_the_chain_and_read_only_or_denied_files(tmp_path):
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert str(storage_error(outer, tmp_path)).startswith("disk quota exceeded writing under ")
    denied = storage_error(PermissionError(errno.EACCES, "Permission denied", "/x/y"), tmp_path)
    assert str(denied).startswith("permission denied writing /x/y") and "make it writable" in str(denied)


def test_other_failures_are_not_storage_errors(tmp_path):
    # no file: a socket
    assert storage_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert storage_error(ValueError("bad"), tmp_path) is None
    assert storage_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), tmp_path) is None
