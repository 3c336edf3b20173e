"""Kubernetes placement of the `gpu`-pool assets (DESIGN §8): `dagster-k8s/config` op tags.

Under `k8s_job_executor` (or `K8sRunLauncher`) each step of a tagged asset becomes a pod that
requests `nvidia.com/gpu` and tolerates the taint GPU nodes carry. Outside Kubernetes the tags are
inert. The cluster decides the numbers, through environment variables of the code location
(deploy/helm-values.yaml sets them):

  COMIC_PIPELINE_GPUS_PER_STEP   GPUs per step pod (default 1; 0 drops the GPU request)
  COMIC_PIPELINE_GPU_RESOURCE    the extended resource name (default nvidia.com/gpu)
  COMIC_PIPELINE_GPU_TOLERATION  taint key to tolerate (default nvidia.com/gpu; empty: none)
  COMIC_PIPELINE_GPU_NODE_SELECTOR  JSON object of node labels, e.g. {"gpu": "a100"} (default none)
  COMIC_PIPELINE_GPU_STEP_CPU / COMIC_PIPELINE_GPU_STEP_MEMORY  requests beside the GPU
                                  (defaults 4 and 16Gi)

`executor_for_environment()` picks the executor from COMIC_PIPELINE_EXECUTOR: `in_process` (the
default on one machine), `multiprocess`, or `k8s` (`k8s_job_executor`, deploy/k8s-executor.yaml).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import dagster as dg
import yaml

K8S_CONFIG_TAG = "dagster-k8s/config"


def gpu_step_k8s_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `dagster-k8s/config` value for one GPU step, from `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    try:
        gpus = int(env.get("COMIC_PIPELINE_GPUS_PER_STEP", "1"))
    except ValueError as error:
        raise ValueError(f"COMIC_PIPELINE_GPUS_PER_STEP must be an integer: {error}") from None
    if gpus < 0:
        raise ValueError(f"COMIC_PIPELINE_GPUS_PER_STEP must be >= 0, got {gpus}")
    resource = env.get("COMIC_PIPELINE_GPU_RESOURCE", "nvidia.com/gpu")
    toleration = env.get("COMIC_PIPELINE_GPU_TOLERATION", "nvidia.com/gpu")
    selector_text = env.get("COMIC_PIPELINE_GPU_NODE_SELECTOR", "").strip()
    try:
        node_selector = json.loads(selector_text) if selector_text else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"COMIC_PIPELINE_GPU_NODE_SELECTOR is not JSON: {error}") from None
    if not isinstance(node_selector, dict) or not all(isinstance(v, str) for v in node_selector.values()):
        raise ValueError(f"COMIC_PIPELINE_GPU_NODE_SELECTOR must be an object of strings, got {selector_text!r}")

    requests = {"cpu": env.get("COMIC_PIPELINE_GPU_STEP_CPU", "4"),
                "memory": env.get("COMIC_PIPELINE_GPU_STEP_MEMORY", "16Gi")}
    limits: dict[str, str] = {}
    if gpus:
        # extended resources: the request must equal the limit
        requests[resource] = limits[resource] = str(gpus)
    pod_spec: dict[str, Any] = {}
    if toleration:
        pod_spec["tolerations"] = [{"key": toleration, "operator": "Exists", "effect": "NoSchedule"}]
    if node_selector:
        pod_spec["node_selector"] = node_selector
    config: dict[str, Any] = {"container_config": {"resources": {"requests": requests, **({"limits": limits} if limits else {})}}}
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return config


def gpu_op_tags(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Op tags for a `gpu`-pool asset: `@dg.asset(..., op_tags=gpu_op_tags())`."""
    return {K8S_CONFIG_TAG: gpu_step_k8s_config(environ)}


EXECUTOR_ENV = "COMIC_PIPELINE_EXECUTOR"
K8S_EXECUTOR_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "k8s-executor.yaml"


def executor_for_environment(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor COMIC_PIPELINE_EXECUTOR names: `in_process` (default), `multiprocess`, or `k8s`
    (`k8s_job_executor` configured from deploy/k8s-executor.yaml or $COMIC_PIPELINE_K8S_EXECUTOR_CONFIG;
    the production profile).

    On one machine every step runs in the run's own process: a step process of the multiprocess
    executor imports Dagster, torch and the store libraries again (seconds per step, most of a short
    run: benchmarks/bench_run_overhead.py), and it buys no parallelism here. The steps of a run form
    a chain, each task/evaluation family is one multi-asset step, and training and embedding share
    the one-slot `gpu` pool and use every core through torch's threads already."""
    env = os.environ if environ is None else environ
    choice = env.get(EXECUTOR_ENV, "in_process")
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "multiprocess":
        return dg.multiprocess_executor
    if choice != "k8s":
        raise ValueError(f"{EXECUTOR_ENV}={choice!r}: expected 'in_process', 'multiprocess' or 'k8s'")
    try:
        from dagster_k8s import k8s_job_executor  # the prod extra
    except ImportError as error:
        raise ImportError(f"{EXECUTOR_ENV}=k8s needs dagster-k8s: pip install 'comic_pipeline[prod]'") from error
    path = env.get("COMIC_PIPELINE_K8S_EXECUTOR_CONFIG") or str(K8S_EXECUTOR_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{EXECUTOR_ENV}=k8s: no k8s_job_executor config at {path}; copy deploy/k8s-executor.yaml into "
            "the image and point COMIC_PIPELINE_K8S_EXECUTOR_CONFIG at it"
        )
    with open(path) as handle:
        return k8s_job_executor.configured(yaml.safe_load(handle), name="k8s_job_executor")
