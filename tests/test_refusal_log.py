"""A refused run's Prefect log says why in one message, with no Python traceback under it."""

import pytest

from tests.conftest import tiny_config


@pytest.mark.e2e
def test_a_refused_served_run_logs_its_message_without_a_traceback(prefect_harness, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.finetune import finetune
    from mixtune.core.policy import ServedPolicy

    policy = ServedPolicy(tracking_uris=["http://127.0.0.1:5000"], data_roots=[str(tmp_path)])
    monkeypatch.setenv("MIXTUNE_SERVED_POLICY", policy.model_dump_json())
    config = tiny_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:9"})
    state = finetune(config, return_state=True)
    assert state.is_failed()
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    text = "\n".join(log.message for log in logs)
    assert "ConfigError: a served run's parameters were refused before any request:\n" in text
    assert "tracking.tracking_uri: http://127.0.0.1:9 is not a tracking server this deployment allows" in text
    assert "Traceback" not in text and 'File "' not in text
