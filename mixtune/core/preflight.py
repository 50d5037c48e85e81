"""Servers a run needs, checked before any work: an unreachable MLflow or Prefect API fails in seconds with
its URL in the message, instead of after minutes of client retries (or, worse, after training)."""

from __future__ import annotations

import logging
import os
import time

import httpx

CREDENTIALS_HINT = {"MLflow tracking server": "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."}
TIMEOUT_S = 10.0  # one probe's wait for an answer (a basic-auth MLflow on loaded cores takes seconds)
PATIENCE_S = 30.0  # a server that accepts connections but answers slowly is busy, not dead: wait this long in all
log = logging.getLogger("mixtune")
clock, wait = time.monotonic, time.sleep  # this module's own names, so a test can stand in for them alone


class Unreachable(RuntimeError):
    """A server the run needs does not answer, or refuses the credentials given."""


def get_patiently(url: str, auth: tuple[str, str] | None, patience_s: float = PATIENCE_S) -> httpx.Response:
    """A refused connection fails at once; a slow answer is asked again with backoff until `patience_s`."""
    deadline, delay = clock() + patience_s, 1.0
    while True:
        try:
            with httpx.Client(timeout=TIMEOUT_S, auth=auth) as client:
                return client.get(url)
        except httpx.TimeoutException:
            left = deadline - clock()
            if left <= 0:
                raise
            delay = min(delay, left)
            log.warning("%s answers slowly (busy?): asking again in %.0f s", url, delay)
            wait(delay)
            delay *= 2


def probe(what: str, url: str, path: str, hint: str, auth: tuple[str, str] | None = None) -> None:
    try:
        response = get_patiently(url.rstrip("/") + path, auth)
    except httpx.HTTPError as err:
        raise Unreachable(f"{what} at {url} is unreachable ({type(err).__name__}: {err}). {hint}") from None
    if response.status_code in (401, 403):
        raise Unreachable(
            f"{what} at {url} refused the credentials (HTTP {response.status_code}). {CREDENTIALS_HINT.get(what, '')}"
        )
    if response.status_code >= 400:
        raise Unreachable(f"{what} at {url} answered HTTP {response.status_code}: is it the right URL? {hint}")


def check_tracking_server(uri: str) -> None:
    """Only http(s) tracking URIs are servers; a sqlite or file store is local and needs no check."""
    if not uri.startswith(("http://", "https://")):
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    probe(
        "MLflow tracking server",
        uri,
        "/api/2.0/mlflow/experiments/search?max_results=1",
        "Start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI.",
        auth=(user, password) if user and password else None,
    )


def check_prefect_api(url: str | None = None) -> None:
    """PREFECT_API_URL, when set, must answer; unset means Prefect's ephemeral local server (nothing to check)."""
    url = url or os.environ.get("PREFECT_API_URL")
    if url:
        probe("Prefect API", url, "/health", "Start it (`prefect server start`) or fix PREFECT_API_URL.")
