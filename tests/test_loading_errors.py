"""Loading failures: one error type, VAELoadError (an OSError), whose message names the model, the repo and what to do.

Hub failures are produced by the real huggingface_hub client talking to a loopback HTTP server that stands in
for the hub. huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when it is imported, so each attempt runs in a
child Python process (one per endpoint, trying several models) that reports, as JSON, the exception, its
chained causes, every log record and every warning; the token must appear in none of them.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import traceback
import warnings

import pytest

from vae_toolkit import VAELoader, VAELoadError, add_model_config

TOKEN = "hf_SECRETfaketoken123"

# repo name -> (status, headers, JSON body), shaped as huggingface_hub's hf_raise_for_status expects them.
HUB_ANSWERS = {
    "gated-vae": (
        403,
        {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model org/gated-vae is restricted"},
        {"error": "Access to model org/gated-vae is restricted"},
    ),
    "missing-vae": (
        404,
        {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
        {"error": "Repository not found"},
    ),
    "private-vae": (
        401,
        {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid username or password."},
        {"error": "Invalid username or password."},
    ),
    "token-vae": (
        401,
        {"X-Error-Message": "Invalid credentials in Authorization header"},
        {"error": "Invalid credentials in Authorization header"},
    ),
    "broken-vae": (500, {}, {"error": "Internal Error"}),
}
# Answers that echo what the client sent, as misconfigured proxies and some servers do: the error texts
# built from them contain the token, so these are the ones that test the redaction.
ECHO_REPOS = ("echo-vae", "echo-gated-vae", "redirect-vae", "redirect-500-vae")


class FakeHub(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str | None]] = []

    def _answer(self) -> None:
        auth = self.headers.get("authorization")
        FakeHub.requests.append((self.command, self.path, auth))
        parts = self.path.split("?")[0].strip("/").split("/")
        repo = parts[3] if parts[:2] == ["api", "models"] and len(parts) > 3 else parts[1] if len(parts) > 1 else ""
        token = (auth or "").removeprefix("Bearer ")
        if repo == "echo-vae":  # 401 whose message and body repeat the Authorization header
            echo = f"Invalid credentials in Authorization header: {auth}"
            status, headers, body = 401, {"X-Error-Message": echo}, {"error": echo, "authorization": auth}
        elif repo == "echo-gated-vae":  # a gated repo whose message names the token it refused
            echo = f"Access to model org/echo-gated-vae is restricted; token {token} has no access"
            status, headers, body = 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": echo}, {"error": echo}
        elif repo in ("redirect-vae", "redirect-500-vae") and "token=" not in self.path:
            # a redirect to a URL that carries the token as a query parameter (a signed-URL style CDN)
            target = self.path.split("?")[0].replace(repo, repo + "-cdn") + f"?token={token}"
            status, headers, body = 302, {"Location": target}, {"error": f"moved to {target}"}
        elif repo == "redirect-vae-cdn":
            status, headers, body = 404, {}, {"error": f"no such file: {self.path}"}
        elif repo == "redirect-500-vae-cdn":
            status, headers, body = 500, {}, {"error": f"server error for {self.path}"}
        else:
            status, headers, body = HUB_ANSWERS.get(repo, (404, {}, {"error": "not found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


CHILD = r"""
import json, logging, sys, traceback, types, warnings

import huggingface_hub.utils._http as hf_http

# The requests and their retries stay real; only the back-off sleeps between retries are skipped.
hf_http.time = types.SimpleNamespace(sleep=lambda seconds: None)

records = []


class Collect(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name}:{record.levelname}:{record.getMessage()}")


handler = Collect(logging.DEBUG)
for name in ("", "diffusers", "huggingface_hub"):
    logging.getLogger(name).addHandler(handler)
    logging.getLogger(name).setLevel(logging.DEBUG)

from vae_toolkit import VAELoader, add_model_config

results = {}
for name, repo_id, token in json.loads(sys.argv[1]):
    add_model_config(name, {"repo_id": repo_id, "subfolder": "vae"})
    records.clear()
    loader = VAELoader()
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loader.load_sd_vae(name, "cpu", token=token)
        except Exception as err:
            chain, cur = [], err
            while cur is not None and len(chain) < 20:
                chain.append(f"{type(cur).__name__}: {cur!s} {cur!r}")
                cur = cur.__cause__ or cur.__context__
            result = {"type": type(err).__name__, "oserror": isinstance(err, OSError), "message": str(err),
                      "repr": repr(err), "chain": chain, "traceback": "".join(traceback.format_exception(err))}
    result.update(logs=list(records), warnings=[str(w.message) for w in caught], loader=repr(loader))
    results[name] = result
print("RESULTS " + json.dumps(results))
"""

# model name -> (repo id, token, endpoint: "hub" or "dead")
ATTEMPTS = {
    "gated": ("org/gated-vae", None, "hub"),
    "gated-with-token": ("org/gated-vae", TOKEN, "hub"),
    "missing": ("org/missing-vae", TOKEN, "hub"),
    "private": ("org/private-vae", None, "hub"),
    "bad-token": ("org/token-vae", TOKEN, "hub"),
    "server-error": ("org/broken-vae", TOKEN, "hub"),
    "no-network": ("org/any-vae", TOKEN, "dead"),
    "echo": ("org/echo-vae", TOKEN, "hub"),
    "echo-gated": ("org/echo-gated-vae", TOKEN, "hub"),
    "redirect": ("org/redirect-vae", TOKEN, "hub"),
    "redirect-500": ("org/redirect-500-vae", TOKEN, "hub"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_hub():
    FakeHub.requests.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def child_results(fake_hub, tmp_path_factory):
    """Run every attempt in ATTEMPTS, one child process per endpoint, the children in parallel."""
    endpoints = {"hub": fake_hub, "dead": f"http://127.0.0.1:{_free_port()}"}  # nothing listens on "dead"
    children = []
    for kind, endpoint in endpoints.items():
        attempts = [(name, repo, token) for name, (repo, token, where) in ATTEMPTS.items() if where == kind]
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(
            HF_ENDPOINT=endpoint,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path_factory.mktemp(f"hf_{kind}")),
            HF_HUB_ETAG_TIMEOUT="3",
            HF_HUB_DOWNLOAD_TIMEOUT="3",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(attempts)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = {}
    for child in children:
        out, err = child.communicate(timeout=120)
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        assert child.returncode == 0 and lines, f"child failed:\n{out}\n{err}"
        results.update(json.loads(lines[-1][len("RESULTS ") :]))
        results.setdefault("_stderr", "")
        results["_stderr"] += err
    return results


# Each message names the model and the repo, then says what happened and what to do.
EXPECTED = {
    "gated": r"Could not load VAE 'gated' from org/gated-vae \(subfolder 'vae'\): the repo is gated: accept the "
    r"license at http://127\.0\.0\.1:\d+/org/gated-vae and set HF_TOKEN \(or pass token=\.\.\.\)\.$",
    "gated-with-token": r"Could not load VAE 'gated-with-token' from org/gated-vae \(subfolder 'vae'\): the repo is "
    r"gated: accept the license at http://127\.0\.0\.1:\d+/org/gated-vae and check that this "
    r"token's account has been granted access\.$",
    "missing": r"Could not load VAE 'missing' from org/missing-vae \(subfolder 'vae'\): the repo was not found on "
    r"the hub \(HTTP 404\); check the repo id, or, if it is private or gated, check that the token can "
    r"read it\.$",
    "private": r"Could not load VAE 'private' from org/private-vae \(subfolder 'vae'\): the repo was not found on "
    r"the hub \(HTTP 401\); check the repo id, or, if it is private or gated, set HF_TOKEN \(or pass "
    r"token=\.\.\.\)\.$",
    "bad-token": r"Could not load VAE 'bad-token' from org/token-vae \(subfolder 'vae'\): the hub rejected the "
    r"token \(HTTP 401\); check HF_TOKEN or the token= argument\.$",
    "server-error": r"Could not load VAE 'server-error' from org/broken-vae \(subfolder 'vae'\): the hub answered "
    r"HTTP 500, a server error; try again later\.$",
    "no-network": r"Could not load VAE 'no-network' from org/any-vae \(subfolder 'vae'\): the hub "
    r"\(http://127\.0\.0\.1:\d+\) could not be reached and the model is not in the local cache; check "
    r"the network or proxy, or pre-download with `hf download org/any-vae --include 'vae/\*'` and set "
    r"HF_HUB_OFFLINE=1\.$",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hub_failures_raise_vae_load_error_saying_what_to_do(child_results, name):
    result = child_results[name]
    assert result.get("type") == "VAELoadError", result
    assert result["oserror"] is True
    assert re.fullmatch(EXPECTED[name], result["message"]), result["message"]
    assert len(result["chain"]) > 1  # the original huggingface_hub / diffusers errors stay chained


def _leaks(result: dict) -> list[str]:
    texts = {
        "message": result["message"],
        "repr": result["repr"],
        "traceback": result["traceback"],
        "loader": result["loader"],
        **{f"chain[{i}]": t for i, t in enumerate(result["chain"])},
        **{f"log[{i}]": t for i, t in enumerate(result["logs"])},
        **{f"warning[{i}]": t for i, t in enumerate(result["warnings"])},
    }
    return [f"{where}: {text}" for where, text in texts.items() if TOKEN in text]


@pytest.mark.parametrize("name", [n for n, (_, token, _) in ATTEMPTS.items() if token])
def test_hub_failures_never_show_the_token(child_results, fake_hub, name):
    """str, repr, the chained causes as traceback.format_exception renders them, warnings and DEBUG logs."""
    result = child_results[name]
    assert result.get("type") == "VAELoadError", result
    assert result["logs"], "expected huggingface_hub/diffusers to log the attempt"
    assert any(r.split(":")[1] == "DEBUG" for r in result["logs"]), "DEBUG records were not collected"
    assert "Traceback" in result["traceback"] and "VAELoadError" in result["traceback"]
    assert _leaks(result) == []
    assert TOKEN not in child_results["_stderr"]


def test_the_echoing_hub_really_puts_the_token_in_the_errors(child_results):
    """Guards the guard: these answers contain the token, so the redaction has something to remove."""
    sent = [r for r in FakeHub.requests if any(repo in r[1] for repo in ECHO_REPOS)]
    assert all(auth == f"Bearer {TOKEN}" for _, path, auth in sent if "-cdn/" not in path)
    assert any(f"token={TOKEN}" in path for _, path, _ in sent)  # the redirect was followed
    for name in ("echo", "echo-gated", "redirect", "redirect-500"):
        assert "***" in child_results[name]["message"] + child_results[name]["traceback"], name


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("echo", r"the hub rejected the token \(HTTP 401\); check HF_TOKEN or the token= argument\.$"),
        ("echo-gated", r"the repo is gated: accept the license at .*org/echo-gated-vae and check that this token's"),
        ("redirect", r"org/redirect-vae"),
        ("redirect-500", r"HTTP 500, a server error; try again later\.$"),
    ],
)
def test_echoing_hub_failures_still_say_what_to_do(child_results, name, hint):
    assert re.search(hint, child_results[name]["message"]), child_results[name]["message"]


def test_the_token_was_really_sent_to_the_hub(child_results):
    sent = {(path, auth) for _, path, auth in FakeHub.requests}
    assert ("/org/missing-vae/resolve/main/vae/config.json", f"Bearer {TOKEN}") in sent
    assert ("/org/private-vae/resolve/main/vae/config.json", None) in sent


def test_server_errors_are_retried_before_giving_up(child_results):
    heads = [r for r in FakeHub.requests if r[0] == "HEAD" and r[1].startswith("/org/broken-vae/")]
    assert len(heads) > 1


# --- failures without a hub (in this process: HF_HUB_OFFLINE=1, the cache holds only sd14) --------------


@pytest.fixture
def all_logs():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "diffusers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield records
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _texts(err: BaseException) -> list[str]:
    texts, cur = [], err
    while cur is not None:
        texts += [str(cur), repr(cur)]
        cur = cur.__cause__ or cur.__context__
    return texts


def test_offline_with_nothing_cached(hf_home, registry, all_logs):
    add_model_config("uncached", {"repo_id": "org/not-cached", "subfolder": "vae"})
    loader = VAELoader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            VAELoadError,
            match=r"^Could not load VAE 'uncached' from org/not-cached \(subfolder "
            r"'vae'\): offline mode is on and config\.json is not in the local "
            r"cache; set HF_HUB_OFFLINE=0 or pre-download with `hf download "
            r"org/not-cached --include 'vae/\*'`\.$",
        ) as info:
            loader.load_sd_vae("uncached", "cpu", token=TOKEN)
    assert isinstance(info.value, OSError)
    texts = _texts(info.value) + all_logs + [str(w.message) for w in caught] + [repr(loader)]
    assert not [t for t in texts if TOKEN in t]


def test_offline_repo_without_subfolder(hf_home, registry):
    add_model_config("uncached", {"repo_id": "org/not-cached"})
    with pytest.raises(
        VAELoadError,
        match=r"^Could not load VAE 'uncached' from org/not-cached: offline mode is on "
        r"and config\.json is not in the local cache; set HF_HUB_OFFLINE=0 or "
        r"pre-download with `hf download org/not-cached`\.$",
    ):
        VAELoader.load_sd_vae_simple("uncached", "cpu")


@pytest.mark.parametrize("path", ["/nonexistent/vae-folder", "./no/such/folder", "no/such/folder"])
def test_missing_local_folder(hf_home, registry, path):
    add_model_config("mine", {"repo_id": path, "subfolder": None})
    with pytest.raises(
        VAELoadError,
        match=rf"^Could not load VAE 'mine' from {path}: the local folder {path} does "
        r"not exist; check the path registered with add_model_config\.$",
    ):
        VAELoader().load_sd_vae("mine", "cpu")


def test_local_folder_without_a_model(hf_home, registry, tmp_path):
    add_model_config("mine", {"repo_id": str(tmp_path), "subfolder": "vae"})
    with pytest.raises(
        VAELoadError,
        match=r"^Could not load VAE 'mine' from .* \(subfolder 'vae'\): the local folder "
        r"does not hold a diffusers autoencoder of a supported class \(AutoencoderKL, .*\) \(.*config\.json.*\)\.$",
    ):
        VAELoader().load_sd_vae("mine", "cpu")


def test_unknown_model_stays_a_value_error(hf_home):
    with pytest.raises(ValueError, match=r"^Unknown model: 'nope'\. Available models: \[.*'sd14'.*\]"):
        VAELoader().load_sd_vae("nope", "cpu", token=TOKEN)


def test_vae_load_error_is_an_oserror_exported_by_the_package():
    import vae_toolkit

    assert issubclass(VAELoadError, OSError)
    assert vae_toolkit.VAELoadError is VAELoadError


def _fail_holding_the_token(repo_id, **kwargs):
    """Stands in for from_pretrained: logs and warns with the token, then fails with it in a chain of errors."""
    token = kwargs["token"]
    logging.getLogger("huggingface_hub.fake").debug("GET %s?token=%s", repo_id, token)
    logging.getLogger("httpx.fake").info("Authorization: Bearer " + token)
    try:
        try:
            raise ConnectionError(f"proxy refused 'Authorization: Bearer {token}'")
        except ConnectionError as inner:
            error = OSError(f"could not fetch https://hub.example/{repo_id}?token={token}")
            error.add_note(f"retried with token {token}")
            raise error from inner
    except OSError:
        logging.getLogger("diffusers.fake").debug("load failed", exc_info=True)
        raise


def test_errors_chained_from_errors_holding_the_token_never_show_it(hf_home, registry, monkeypatch, all_logs):
    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", _fail_holding_the_token)
    add_model_config("leaky", {"repo_id": "org/leaky-vae", "subfolder": "vae"})
    formatted_logs: list[str] = []

    class Format(logging.Handler):
        def emit(self, record):
            formatted_logs.append(logging.Formatter().format(record))

    handler = Format(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(VAELoadError, match=r"^Could not load VAE 'leaky' from org/leaky-vae") as info:
            VAELoader().load_sd_vae("leaky", "cpu", token=TOKEN)
    finally:
        logging.getLogger().removeHandler(handler)
    err = info.value
    rendered = "".join(traceback.format_exception(err))
    assert "ConnectionError" in rendered and "could not fetch" in rendered  # the causes are still shown ...
    assert "?token=***" in rendered and "Bearer ***" in rendered and "retried with token ***" in rendered
    texts = {"str": str(err), "repr": repr(err), "traceback": rendered, **dict(enumerate(all_logs + formatted_logs))}
    assert [k for k, text in texts.items() if TOKEN in text] == []  # ... without the token
    assert any("token=***" in line for line in all_logs) and any("Bearer ***" in line for line in all_logs)


def test_log_redaction_is_limited_to_the_load(hf_home, all_logs):
    """Outside a load with a token, log records are left exactly as they were made."""
    VAELoader().load_sd_vae("sd14", "cpu", token=TOKEN)
    logging.getLogger("elsewhere").warning("user's own record mentions %s", TOKEN)
    assert all_logs[-1] == f"user's own record mentions {TOKEN}"
