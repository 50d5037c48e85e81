"""Test environment: offline, no telemetry, Prefect state in a throwaway PREFECT_HOME, one Prefect test
harness (an ephemeral server, 11-19 s to start) shared by every test that runs a flow, and one cache folder
shared by the tests that only need the tiny config's data and base model (built once, not once per test)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mixtune-prefect-")
# As `mixtune` and the flow set it: a cache entry a fixture builds is owner-only, like one a run builds, whichever
# test (or xdist worker) builds the shared entry first.
os.umask(0o077)
if "PYTEST_XDIST_WORKER" in os.environ:
    # One thread per worker (and the runs it starts): N workers on N cores, instead of each worker's torch
    # spreading tiny matmuls over every core that the other workers are using too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
import mixtune  # noqa: E402,F401  (applies the offline defaults before Prefect is imported)
from mixtune.core.config import validate_config  # noqa: E402

# The longest modules first, so that under `make test` (xdist, a module per worker, `--no-loadscope-reorder`) the
# workers end together: xdist's own order queues modules by their test count, which left one-test modules of a minute
# or more (resume, SIGTERM, two nodes) running alone at the end. Ordered by their seconds in `make test`, 2026-12-08; a
# module not named runs after these. Order only: no test depends on another's.
LONGEST_MODULES_FIRST = (
    "test_basic_auth_server",
    "test_resume",
    "test_worker",
    "test_servers",
    "test_bounds",
    "test_docker",
    "test_retention",
    "test_e2e",
    "test_forgetting_bench",
    "test_retrain",
    "test_names",
    "test_devices",
    "test_disk_full",
    "test_checkpoints",
    "test_nodes",
    "test_sigterm",
    "test_interpolate",
    "test_ramp_e2e",
    "test_forgetting_stop",
    "test_rehearsal",
    "test_bad_input",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):  # a bound for a hung server, not a speed
        yield


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """Cache entries are keyed by their inputs' content (mixtune/core/cache.py), so runs of one data set,
    tokenizer and pre-training settings can share them safely: the first test builds, the others reuse. Under
    pytest-xdist every worker shares one: the cache's own locks make concurrent builders build each entry once."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp("session-cache")
    shared = tmp_path_factory.getbasetemp().parent / "session-cache"
    shared.mkdir(mode=0o700, exist_ok=True)  # as mktemp makes it: runs check their folders are owner-only
    return shared


def share_cache(output_dir: Path, cache: Path) -> Path:
    """`output_dir` keeps its own MLflow database, run folders and locks; its cache/ is `cache`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "cache").symlink_to(cache, target_is_directory=True)
    return output_dir


@pytest.fixture
def shared_cache(tmp_path, session_cache) -> Path:
    """tmp_path, with the session's cache: for a test that needs a base model, not a fresh build of one. Tests
    of the cache itself, and tests that fake a cached stage's work, keep a cache of their own."""
    return share_cache(tmp_path, session_cache)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with its tables made. MLflow migrates every new database, seconds on
    two cores (30-47 s each at load 25), once per test that logs a run; a copy of this opens at once."""
    from tasks.tracking import open_store

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    open_store(f"sqlite:///{path}")
    return path


def ready_mlflow(output_dir: Path, template: Path) -> Path:
    """`output_dir` with a copy of the template where a run's default tracking URI looks for its database."""
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, output_dir / "mlflow.db")
    (output_dir / "mlflow.db").chmod(0o600)  # as a run's own umask makes it
    return output_dir


@pytest.fixture
def mlflow_db(tmp_path, mlflow_template) -> Path:
    return ready_mlflow(tmp_path, mlflow_template)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, session_cache):
    """The tiny config's token tables and pre-trained base model, made by the functions the flow's tasks call,
    in the session's cache: (tokens, base model folder)."""
    from tasks.base_model import prepare_base, prepare_tokenizer
    from tasks.ingest import ingest
    from tasks.tokenize import tokenize

    config = tiny_config(share_cache(tmp_path_factory.mktemp("tiny-base"), session_cache))
    data = ingest(config)
    tokenizer_dir = prepare_tokenizer(config, data.samples, data.key)
    tokens = tokenize(data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir)
    return tokens, prepare_base(config, tokenizer_dir, tokens.pretrain, tokens.key)


@pytest.fixture(scope="session")
def single_device_run(prefect_harness, tmp_path_factory, session_cache, mlflow_template):
    """The one-process run of tests/test_devices.py's stage: the curve that two processes and two nodes follow."""
    from flows.finetune import finetune
    from tests.test_devices import SECTIONS

    folder = ready_mlflow(share_cache(tmp_path_factory.mktemp("one-device"), session_cache), mlflow_template)
    return finetune(tiny_config(folder, **SECTIONS))


def sft_table(config) -> str:
    """The SFT token table a run of `config` trained on, found the way the flow keys it (all of it cached by
    then, so this reads and builds nothing), not by globbing a cache other runs share."""
    from tasks.base_model import prepare_tokenizer
    from tasks.ingest import ingest
    from tasks.tokenize import tokenize

    data = ingest(config)
    tokenizer_dir = prepare_tokenizer(config, data.samples, data.key)
    max_len, overlong = config.model.max_seq_len, config.data.overlong
    return tokenize(data.samples, data.key, tokenizer_dir, max_len, config.run.output_dir, overlong).sft


def tiny_raw_config(output_dir: Path, **sections) -> dict:
    """A config small enough for a test: a 2-layer model, 3 stages of 10 steps each."""
    raw = {
        "run": {"name": "test", "output_dir": str(output_dir), "seed": 0},
        "data": {
            "sources": [
                {"synthetic": "general", "samples": 800, "role": "general"},
                {"synthetic": "domain", "samples": 400, "role": "domain", "val_fraction": 0.15},
            ]
        },
        "model": {"preset": "tiny", "max_seq_len": 128},
        "pretrain": {"epochs": 1},
        "schedule": {"start": 0.1, "end": 0.5, "stages": 3, "samples_per_stage": 160},
        "train": {"method": "full", "batch_size": 16, "logging_steps": 5},
        "validation": {"eval_steps": 5, "patience": 3},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


# One stage of one step (16 samples, batch 16): a run that trains, validates, registers and is named, for tests
# of what surrounds training (names, registry, servers), not of the training itself.
ONE_STEP = {"schedule": {"stages": 1, "samples_per_stage": 16}}


def tiny_config(output_dir: Path, **sections):
    return validate_config(tiny_raw_config(output_dir, **sections), "test config", base_dir=output_dir)


def tiny_hf_model(folder: Path) -> Path:
    """A real (random, tiny) Hugging Face model folder with a tokenizer: what a registry version needs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.base_model import train_tokenizer

    tokenizer = train_tokenizer(["a tiny model for the registry"] * 20, 300, folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def finished_stage_report(folder: Path, losses, task_metrics: dict):
    """Stage 1 of a run, finished within budget: what summary and table tests print."""
    from tasks.guard import GateDecision
    from tasks.records import StageReport

    return StageReport(
        stage=1,
        target_share=0.1,
        realised_share=0.1,
        source_epochs={},
        losses=losses,
        gate=GateDecision(decision="continue", general_drift=0.01, reason="within budget"),
        steps=10,
        best_step=10,
        stopped_early=False,
        stop_reason=None,
        tokens_per_second=1.0,
        stage_dir=str(folder),
        model_dir=str(folder),
        run_id="r",
        task_metrics=task_metrics,
    )
