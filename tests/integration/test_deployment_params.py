"""The flow's typed parameter as Prefect sees it: the schema deployments carry and enforce."""

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError

from flows.finetune import finetune
from lora_core.config import PipelineConfig, load_recipe

from conftest import REPO  # noqa: E402


def test_the_run_form_sees_every_recipe_field_with_its_type_and_default():
    schema = finetune.parameters.model_dump()
    assert schema["required"] == ["config"]
    config = schema["definitions"]["PipelineConfig"]
    assert set(config["properties"]) == set(PipelineConfig.model_fields)
    lora = schema["definitions"]["LoraConfig"]["properties"]
    assert lora["r"]["type"] == "integer" and lora["r"]["default"] == 8 and lora["r"]["description"] == "LoRA rank."
    assert schema["properties"]["refresh"]["anyOf"][0]["items"]["enum"] == ["download", "format", "split", "train", "evaluate", "merge"]


def test_a_deployment_refuses_a_wrong_type_before_any_run_exists(prefect_harness):
    good = load_recipe(REPO / "recipes" / "socratic-tutor.yaml").model_dump(mode="json")
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(finetune)
        dep = client.create_deployment(flow_id, "typed-params", parameter_openapi_schema=finetune.parameters.model_dump(),
                                       enforce_parameter_schema=True, parameters={"config": good})
        with pytest.raises(PrefectHTTPStatusError) as bad:
            client.create_flow_run_from_deployment(dep, parameters={"config": {**good, "lora": {"r": "sixteen"}}})
        assert bad.value.response.status_code in (409, 422) and "sixteen" in bad.value.response.text
        with pytest.raises(PrefectHTTPStatusError):
            client.create_flow_run_from_deployment(dep, parameters={"config": good, "refresh": ["training"]})
        accepted = client.create_flow_run_from_deployment(dep, parameters={"config": {**good, "lora": {**good["lora"], "r": 16}}})
        assert accepted.parameters["config"]["lora"]["r"] == 16
        runs = client.read_flow_runs()
        assert [r.id for r in runs if r.deployment_id == dep] == [accepted.id]  # the refused ones never became runs
