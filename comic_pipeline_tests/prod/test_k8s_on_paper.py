"""Kubernetes on paper (no cluster here): deploy/ validates against Dagster's schema, and the Job
Dagster would submit for the GPU step validates against the Kubernetes schema and asks for a GPU."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest
import yaml

from comic_pipeline.dagster_storage import POOL_DEFAULTS, postgres_storage_config
from comic_pipeline.definitions import defs
from comic_pipeline.demo import graph_definitions
from comic_pipeline.defs import k8s

pytestmark = pytest.mark.prod

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ENV = {"DAGSTER_PG_HOST": "postgres", "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "secret",
       "DAGSTER_PG_DB": "dagster", "DAGSTER_K8S_NAMESPACE": "comic-pipeline",
       "DAGSTER_COMPUTE_LOG_BUCKET": "logs"}
GPU_JOB = "gpu_training"


def _validate_instance_yaml(folder: Path) -> dict:
    """Dagster's own checks of a dagster.yaml: the instance schema, then each configurable class's
    config schema (run launcher, coordinator, compute logs, the three storages)."""
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(folder))
    checked = {}
    for section in ("run_launcher", "run_coordinator", "compute_logs", "run_storage", "event_log_storage",
                    "schedule_storage"):
        data = config[section]
        result = process_config(_class_of(data).config_type(), data.get("config") or {})
        if not result.success:
            raise dg.DagsterInvalidConfigError(f"{section}: invalid config", result.errors, data.get("config"))
        checked[section] = result.value
    return checked


def _class_of(data: dict):
    import importlib

    return getattr(importlib.import_module(data["module"]), data["class"])


@pytest.fixture
def deploy_env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


def test_production_dagster_yaml_validates_against_dagsters_schema(deploy_env, tmp_path):
    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    checked = _validate_instance_yaml(tmp_path)
    assert checked["run_launcher"]["job_namespace"] == "comic-pipeline"
    assert checked["event_log_storage"]["pool_size"] == 1
    # the file is the instance that postgres_storage_config builds for the prod tests and benchmarks
    raw = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    postgres_db = raw["run_storage"]["config"]["postgres_db"]
    assert postgres_db["scheme"] == "postgresql+psycopg2"
    pool = {name: raw["event_log_storage"]["config"][name] for name in POOL_DEFAULTS}
    assert {key: raw[key] for key in ("run_storage", "event_log_storage", "schedule_storage")} == \
        postgres_storage_config(postgres_db, **pool)
    assert raw["concurrency"]["pools"]["default_limit"] >= 1
    # a run that failed on purpose (a gate, a refused champion) is not retried; a dead pod is
    assert raw["run_retries"] == {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": False}
    helm = yaml.safe_load((DEPLOY / "helm-values.yaml").read_text())
    assert helm["dagsterDaemon"]["runRetries"] == {"enabled": True, "maxRetries": 1,
                                                   "retryOnAssetOrOpFailure": False}


@pytest.mark.parametrize("section, typo", [
    ("run_launcher", {"job_namespce": "x"}),  # a misspelt launcher field
    ("compute_logs", {"buckett": "x"}),
    ("event_log_storage", {"pool_sise": 2}),
])
def test_a_typo_in_the_launcher_compute_log_or_event_log_config_fails(deploy_env, tmp_path, section, typo):
    raw = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    raw[section]["config"].update(typo)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(dg.DagsterInvalidConfigError, match=next(iter(typo))):
        _validate_instance_yaml(tmp_path)


def test_a_typo_at_the_top_of_the_instance_fails(deploy_env, tmp_path):
    raw = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    raw["run_launchr"] = raw.pop("run_launcher")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(dg.DagsterInvalidConfigError):
        _validate_instance_yaml(tmp_path)


def _executor_config_result(config: dict):
    from dagster._config import process_config, resolve_to_config_type
    from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA

    return process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), config)


def test_k8s_executor_config_validates_and_a_typo_fails():
    config = yaml.safe_load((DEPLOY / "k8s-executor.yaml").read_text())
    assert _executor_config_result(config).success
    broken = copy.deepcopy(config)
    broken["step_k8s_config"]["container_confg"] = broken["step_k8s_config"].pop("container_config")
    result = _executor_config_result(broken)
    assert not result.success and "container_confg" in str(result.errors)
    assert k8s.executor_for_environment({"COMIC_PIPELINE_EXECUTOR": "k8s"}).name == "k8s_job_executor"
    assert k8s.executor_for_environment({}).name == "in_process"  # one machine: no step processes
    assert k8s.executor_for_environment({"COMIC_PIPELINE_EXECUTOR": "multiprocess"}).name == "multiprocess"
    with pytest.raises(ValueError, match="COMIC_PIPELINE_EXECUTOR"):
        k8s.executor_for_environment({"COMIC_PIPELINE_EXECUTOR": "celery"})


def test_gpu_tags_are_configurable_and_bad_values_are_clear_errors():
    config = k8s.gpu_step_k8s_config({"COMIC_PIPELINE_GPUS_PER_STEP": "2",
                                      "COMIC_PIPELINE_GPU_NODE_SELECTOR": '{"gpu": "h100"}'})
    assert config["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert config["pod_spec_config"]["node_selector"] == {"gpu": "h100"}
    assert "limits" not in k8s.gpu_step_k8s_config({"COMIC_PIPELINE_GPUS_PER_STEP": "0"})["container_config"]["resources"]
    with pytest.raises(ValueError, match="COMIC_PIPELINE_GPUS_PER_STEP"):
        k8s.gpu_step_k8s_config({"COMIC_PIPELINE_GPUS_PER_STEP": "many"})
    with pytest.raises(ValueError, match="NODE_SELECTOR"):
        k8s.gpu_step_k8s_config({"COMIC_PIPELINE_GPU_NODE_SELECTOR": "[1]"})


# --- the GPU step's Job, as K8sStepHandler would submit it ---------------------------------------
def gpu_training_job() -> dg.JobDefinition:
    """The real sequence_model asset (its real op tags) in a one-step job; module level so that
    `reconstructable` can name it, as a code location would."""
    full = defs()
    definitions = dg.Definitions(assets=graph_definitions(full), resources=full.resources,
                                 jobs=[dg.define_asset_job(GPU_JOB, selection=["sequence_model"])])
    return definitions.resolve_job_def(GPU_JOB)


def _kubeconfig(tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "paper",
        "clusters": [{"name": "paper", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "paper", "user": {"token": "unused"}}],
        "contexts": [{"name": "paper", "context": {"cluster": "paper", "user": "paper", "namespace": "comic-pipeline"}}],
    }))
    return str(path)


def _submitted_gpu_job(tmp_path: Path) -> dict:
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.execution.retries import RetryMode
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
    from dagster._core.test_utils import create_run_for_test
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.client import DagsterKubernetesClient
    from kubernetes.client import ApiClient

    kubeconfig = _kubeconfig(tmp_path)
    launcher_config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["run_launcher"]["config"]
    launcher_config.update(load_incluster_config=False, kubeconfig_file=kubeconfig, job_image="comic-pipeline:test",
                           job_namespace="comic-pipeline")
    executor_config = yaml.safe_load((DEPLOY / "k8s-executor.yaml").read_text())
    executor_config.update(load_incluster_config=False, kubeconfig_file=kubeconfig)
    result = _executor_config_result(executor_config)
    assert result.success, result.errors

    recon = dg.reconstructable(gpu_training_job)
    with dg.instance_for_test(overrides={"run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher",
                                                          "config": launcher_config}}) as instance:
        job_def = recon.get_definition()
        executor = k8s_job_executor.executor_creation_fn(InitExecutorContext(
            job=recon, executor_def=k8s_job_executor, executor_config=result.value, instance=instance))
        batch_api = mock.MagicMock()
        handler = executor._step_handler  # noqa: SLF001 - the handler the executor really uses
        handler._api_client = DagsterKubernetesClient.production_client(batch_api_override=batch_api)  # noqa: SLF001
        run = create_run_for_test(instance, job_name=GPU_JOB, job_code_origin=recon.get_python_origin())
        plan = create_execution_plan(recon)
        plan_context = PlanOrchestrationContext(
            plan_data=PlanData(job=recon, dagster_run=run, instance=instance, execution_plan=plan,
                               raise_on_error=True, retry_mode=RetryMode.DISABLED),
            log_manager=create_context_free_log_manager(instance, run), executor=executor, output_capture=None)
        step_keys = [step.key for step in plan.steps]
        assert step_keys == ["sequence_model"], step_keys
        list(handler.launch_step(StepHandlerContext(
            instance=instance, plan_context=plan_context, steps=plan.steps,
            execute_step_args=ExecuteStepArgs(recon.get_python_origin(), run.run_id, step_keys))))
        assert job_def.name == GPU_JOB
    calls = [c for c in batch_api.method_calls if c[0] == "create_namespaced_job"]
    assert len(calls) == 1
    return ApiClient().sanitize_for_serialization(calls[0].kwargs["body"])


def test_gpu_step_job_validates_against_kubernetes_and_requests_a_gpu(tmp_path, monkeypatch):
    import kubernetes_validate

    job = _submitted_gpu_job(tmp_path)
    version = kubernetes_validate.utils.latest_version()
    kubernetes_validate.validate(job, version, strict=True)  # raises on any schema violation
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == "comic-pipeline:test"
    assert any(e.get("configMapRef", {}).get("name") == "comic-pipeline-env" for e in container.get("envFrom", []))

    # the same validation catches a typo in the Job
    broken = copy.deepcopy(job)
    broken["spec"]["template"]["spec"]["tolerationz"] = broken["spec"]["template"]["spec"].pop("tolerations")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
