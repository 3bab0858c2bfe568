"""The flow's typed parameter as Prefect sees it: the schema deployments carry and enforce."""

import pytest
from conftest import REPO
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError

from flows.finetune import finetune
from lora_core.config import PipelineConfig, load_recipe


def test_the_run_form_sees_every_recipe_field_with_its_type_and_default():
    schema = finetune.parameters.model_dump()
    assert schema["required"] == ["config"]
    config = schema["definitions"]["PipelineConfig"]
    assert set(config["properties"]) == set(PipelineConfig.model_fields)
    lora = schema["definitions"]["LoraConfig"]["properties"]
    assert (
        lora["r"]["type"] == "integer"
        and lora["r"]["default"] == 8
        and lora["r"]["description"] == "LoRA rank."
    )
    assert schema["properties"]["refresh"]["anyOf"][0]["items"]["enum"] == [
        "download",
        "format",
        "split",
        "train",
        "evaluate",
        "merge",
    ]


def test_a_deployment_refuses_a_wrong_type_before_any_run_exists(prefect_harness):
    good = load_recipe(REPO / "recipes" / "socratic-tutor.yaml").model_dump(mode="json")
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(finetune)
        dep = client.create_deployment(
            flow_id,
            "typed-params",
            parameter_openapi_schema=finetune.parameters.model_dump(),
            enforce_parameter_schema=True,
            parameters={"config": good},
        )
        with pytest.raises(PrefectHTTPStatusError) as bad:
            client.create_flow_run_from_deployment(
                dep, parameters={"config": {**good, "lora": {"r": "sixteen"}}}
            )
        assert bad.value.response.status_code in (409, 422) and "sixteen" in bad.value.response.text
        with pytest.raises(PrefectHTTPStatusError):
            client.create_flow_run_from_deployment(dep, parameters={"config": good, "refresh": ["training"]})
        accepted = client.create_flow_run_from_deployment(
            dep, parameters={"config": {**good, "lora": {**good["lora"], "r": 16}}}
        )
        assert accepted.parameters["config"]["lora"]["r"] == 16
        runs = client.read_flow_runs()
        # the refused ones never became runs
        assert [r.id for r in runs if r.deployment_id == dep] == [accepted.id]


def test_a_partial_config_changes_the_deployments_recipe_not_every_key(
    prefect_harness, make_recipe, mlflow_store
):
    """`prefect deployment run ... --param config='{"train": {"max_steps": 2}}'`: the run trains the
    deployment's recipe with that one change (without the merge it would be the all-defaults recipe:
    another name, data, model)."""
    from mlflow.tracking import MlflowClient
    from prefect.flow_engine import run_flow

    recipe = load_recipe(make_recipe("deployed")).model_dump(mode="json")
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(finetune)
        dep = client.create_deployment(
            flow_id,
            "partial",
            parameter_openapi_schema=finetune.parameters.model_dump(),
            enforce_parameter_schema=True,
            parameters={"config": recipe},
        )
        flow_run = client.create_flow_run_from_deployment(
            dep, parameters={"config": {"train": {"max_steps": 2}}}
        )
    # what the API holds: the change alone
    assert flow_run.parameters["config"] == {"train": {"max_steps": 2}}
    summary = run_flow(finetune, flow_run=flow_run, parameters=flow_run.parameters)  # what a worker runs
    params = MlflowClient(mlflow_store).get_run(summary.mlflow_run_id).data.params
    assert params["name"] == "deployed" and params["train.max_steps"] == "2"
    assert params["data.path"] == recipe["data"]["path"] and params["train.batch_size"] == str(
        recipe["train"]["batch_size"]
    )
