"""Hub upload through the real ``huggingface_hub`` client, over real HTTP, to a loopback Hub.

``FakeHub`` answers what ``create_repo``, ``create_branch`` and ``upload_folder`` call:
repo creation, YAML validation of the card, ``preupload`` (every file "regular", with the oid
of the file the branch already holds, as the Hub does), the NDJSON commit carrying base64
file contents, and the revision info the client asks for when nothing changed. Any other
route is recorded and answered 404, and each test asserts there were none.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import shutil
import threading
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import yaml
from huggingface_hub import ModelCard
from test_folder import make_run

from fbnprune.publish.folder import export_run, list_files
from fbnprune.publish.hub import HubError, push_folder

pytestmark = pytest.mark.hub

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"
REPO = "someone/tiny-pruned"
MAX_BODY = 32 * 2**20


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(http.server.ThreadingHTTPServer):
    """A loopback Hub: repos -> branches -> {path: bytes}; records every request."""

    daemon_threads = True

    def __init__(self, token: str = TOKEN) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.unknown: list[str] = []
        self.commits: list[dict] = []
        self.validated: list[dict] = []
        self.fail: dict[str, int] = {}  # route name -> status to answer with
        self.echo_token = False  # a 401 that repeats the token it got, URL-encoded and base64
        self.lock = threading.Lock()

    def files(self, repo: str = REPO, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict | None = None, headers: dict | None = None):
        body = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD reply announces the body's length, sends none
            self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
                assert len(data) <= MAX_BODY
            self.rfile.readline()
            return data
        length = int(self.headers.get("Content-Length") or 0)
        assert length <= MAX_BODY
        return self.rfile.read(length)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        hub = self.server
        body = self._body()
        path = urlsplit(self.path).path
        with hub.lock:
            hub.requests.append(
                {
                    "method": self.command,
                    "url": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )
        parts = [unquote(p) for p in path.strip("/").split("/")]
        route = self._route(parts)
        if route is None:
            with hub.lock:
                hub.unknown.append(f"{self.command} {self.path}")
            return self._reply(404, {"error": "unknown route"})
        name, args = route
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            message = "Invalid credentials in Authorization header"
            if hub.echo_token:
                got = self.headers.get("Authorization", "").removeprefix("Bearer ")
                basic = base64.b64encode(f"user:{got}".encode()).decode()
                message += f" (token={quote(got, safe='')}, as basic: {basic})"
            return self._reply(401, {"error": message}, {"X-Error-Message": message})
        if name in hub.fail:
            return self._reply(hub.fail[name], {"error": f"injected failure of {name}"})
        with hub.lock:
            return getattr(self, f"_{name}")(body, *args)

    def _route(self, parts: list[str]) -> tuple[str, tuple] | None:
        method = self.command
        if method == "POST" and parts == ["api", "repos", "create"]:
            return "create", ()
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return "validate", ()
        if method == "GET" and len(parts) == 4 and parts[:2] == ["api", "models"]:
            return "revision", (f"{parts[2]}/{parts[3]}", "main")  # repo_info
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return "resolve", (f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if method == "POST" and action in ("preupload", "commit", "branch"):
                return action, (repo, rest)
            if method == "GET" and action == "revision":
                return "revision", (repo, rest)
        return None

    # -- routes -----------------------------------------------------------------------------
    def _create(self, body: bytes) -> None:
        data = json.loads(body)
        repo = f"{data['organization']}/{data['name']}"
        url = f"{self.server.url}/{repo}"
        if repo in self.server.repos:
            return self._reply(409, {"error": "You already created this model repo", "url": url})
        self.server.repos[repo] = {
            "private": data.get("visibility") == "private",
            "branches": {"main": {}},
            "head": {"main": "0" * 40},
        }
        return self._reply(200, {"url": url, "name": repo})

    def _validate(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        try:
            _, front, _ = content.split("---\n", 2)
            metadata = yaml.safe_load(front)
            assert isinstance(metadata, dict)
        except Exception as exc:  # noqa: BLE001
            return self._reply(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        self.server.validated.append(metadata)
        return self._reply(200, {"errors": [], "warnings": []})

    def _repo(self, repo: str) -> dict | None:
        return self.server.repos.get(repo)

    def _preupload(self, body: bytes, repo: str, revision: str) -> None:
        state = self._repo(repo)
        if state is None or revision not in state["branches"]:
            return self._reply(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        held = state["branches"][revision]
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_oid(held[f["path"]]) if f["path"] in held else None,
            }
            for f in json.loads(body)["files"]
        ]
        return self._reply(200, {"files": files, "commitOid": state["head"][revision]})

    def _commit(self, body: bytes, repo: str, revision: str) -> None:
        state = self._repo(repo)
        if state is None or revision not in state["branches"]:
            return self._reply(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        added = {}
        for line in lines[1:]:
            if line["key"] != "file":
                return self._reply(400, {"error": f"unsupported operation {line['key']}"})
            assert line["value"]["encoding"] == "base64"
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        state["branches"][revision].update(added)
        oid = hashlib.sha1(body).hexdigest()
        state["head"][revision] = oid
        self.server.commits.append(
            {
                "repo": repo,
                "revision": revision,
                "files": added,
                "summary": lines[0]["value"]["summary"],
            }
        )
        return self._reply(
            200,
            {
                "commitUrl": f"{self.server.url}/{repo}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            },
        )

    def _branch(self, body: bytes, repo: str, branch: str) -> None:
        state = self._repo(repo)
        if branch in state["branches"]:
            return self._reply(409, {"error": "branch exists"})
        state["branches"][branch] = dict(state["branches"]["main"])
        state["head"][branch] = state["head"]["main"]
        return self._reply(200, {})

    def _resolve(self, body: bytes, repo: str, revision: str, name: str) -> None:
        held = self._repo(repo)["branches"].get(revision, {})
        if name not in held:
            return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = held[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{git_oid(data)}"')
        self.send_header("X-Repo-Commit", self._repo(repo)["head"][revision])
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def _revision(self, body: bytes, repo: str, revision: str) -> None:
        state = self._repo(repo)
        files = state["branches"][revision]
        return self._reply(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": state["head"][revision],
                "private": state["private"],
                "siblings": [{"rfilename": f} for f in files],
            },
        )


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it for downloads
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    server = FakeHub()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert server.unknown == [], f"routes the fake Hub does not answer: {server.unknown}"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    run_dir, _ = make_run(root, layouts=("compact",))
    return export_run(run_dir, root / "export", repo_id=REPO).out_dir


def snapshot(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in list_files(folder)
    }


def assert_no_token_anywhere(hub: FakeHub, *texts: str, folder: Path | None = None) -> None:
    for request in hub.requests:
        assert TOKEN not in request["url"]
        assert TOKEN.encode() not in request["body"]
        for key, value in request["headers"].items():
            if key.lower() != "authorization":
                assert TOKEN not in value, key
    for text in texts:
        assert TOKEN not in text
    if folder is not None:
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_push_uploads_every_file_byte_identical(hub, export_dir, caplog):
    caplog.set_level(logging.DEBUG)
    before = snapshot(export_dir)
    result = push_folder(
        export_dir, REPO, token=TOKEN, endpoint=hub.url, commit_message="first upload"
    )
    local = {name: (export_dir / name).read_bytes() for name in list_files(export_dir)}
    assert hub.files() == local
    assert result.files == {name: len(data) for name, data in local.items()}
    assert hub.commits[-1]["summary"] == "first upload"
    assert result.commit_url.startswith(f"{hub.url}/{REPO}/commit/")
    # the card was validated, and its metadata parses and holds the evaluation results
    assert hub.validated and hub.validated[0]["model-index"]
    card = ModelCard(hub.files()["README.md"].decode())
    assert {"pruned", "fbnprune", "functional-networks"} <= set(card.data.tags)
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    base = json.loads((export_dir / "fbnprune_plan.json").read_text())["model"]
    assert values == {"acc (pruned)": 0.68, f"acc (original {base})": 0.75}
    # the token was used, and only in the Authorization header
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert_no_token_anywhere(hub, result.summary(), caplog.text, folder=export_dir)
    assert snapshot(export_dir) == before


def test_retry_sends_only_changed_files(hub, export_dir, tmp_path):
    push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert len(hub.commits) == 1
    # unchanged: the Hub reports the oids it holds, the client commits nothing
    push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert len(hub.commits) == 1
    commit_bodies = [r["body"] for r in hub.requests if "/commit/" in r["url"]]
    assert len(commit_bodies) == 1
    # one changed file: only that file travels
    changed = tmp_path / "changed"
    shutil.copytree(export_dir, changed)
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nEdited.\n")
    push_folder(changed, REPO, token=TOKEN, endpoint=hub.url)
    assert list(hub.commits[-1]["files"]) == ["README.md"]
    assert hub.files()["README.md"].endswith(b"Edited.\n")


def test_revision_branch_and_private(hub, export_dir):
    result = push_folder(
        export_dir, REPO, token=TOKEN, endpoint=hub.url, revision="pruned-v1", private=True
    )
    assert hub.repos[REPO]["private"]
    assert set(hub.files(branch="pruned-v1")) == set(list_files(export_dir))
    assert hub.files(branch="main") == {}
    assert result.revision == "pruned-v1" and hub.commits[-1]["revision"] == "pruned-v1"


def test_token_and_endpoint_from_the_environment_at_call_time(hub, export_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # set after huggingface_hub was imported
    result = push_folder(export_dir, REPO)
    assert result.endpoint == hub.url and set(hub.files()) == set(list_files(export_dir))


def test_auth_failure_is_clear_tokenless_and_leaves_the_folder(hub, export_dir):
    wrong = "hf_WrongTokenAlsoSecret9876543210zyx"
    before = snapshot(export_dir)
    with pytest.raises(HubError) as info:
        push_folder(export_dir, REPO, token=wrong, endpoint=hub.url)
    err = info.value
    assert err.reason == "auth" and err.status == 401
    message = str(err)
    assert "token was rejected (401)" in message and "is intact" in message
    assert wrong not in message and wrong not in repr(err) and err.__context__ is None
    assert err.__cause__ is None
    assert snapshot(export_dir) == before and REPO not in hub.repos


def test_a_token_echoed_url_encoded_or_in_base64_never_shows(hub, export_dir):
    wrong = "hf_Wrong/Token+With=Marks9876543210zyx"
    hub.echo_token = True
    with pytest.raises(HubError) as info:
        push_folder(export_dir, REPO, token=wrong, endpoint=hub.url)
    shown = f"{info.value} {info.value!r}"
    encoded = [quote(wrong, safe=""), base64.b64encode(f"user:{wrong}".encode()).decode()]
    assert info.value.reason == "auth" and "Invalid credentials" in shown
    assert not any(form in shown for form in [wrong, *encoded])
    assert "Marks987" not in shown and "V3JvbmcvVG9rZW4r" not in shown  # no long piece


def test_server_error_is_clear_and_leaves_the_folder(hub, export_dir):
    hub.fail["create"] = 500
    before = snapshot(export_dir)
    with pytest.raises(HubError) as info:
        push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert info.value.reason == "server" and info.value.status == 500
    assert "server error (500)" in str(info.value) and TOKEN not in str(info.value)
    assert snapshot(export_dir) == before


def test_quota_failure_mid_upload_then_retry_succeeds(hub, export_dir):
    hub.fail["commit"] = 413
    with pytest.raises(HubError) as info:
        push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert info.value.reason == "quota" and "413" in str(info.value)
    assert TOKEN not in str(info.value) and hub.files() == {}
    del hub.fail["commit"]
    push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert set(hub.files()) == set(list_files(export_dir))


def test_network_failure(export_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    closed = FakeHub()  # bind a free port, then close it: nothing listens there
    url = closed.url
    closed.server_close()
    with pytest.raises(HubError) as info:
        push_folder(export_dir, REPO, token=TOKEN, endpoint=url)
    assert info.value.reason == "network" and "could not reach" in str(info.value)
    assert TOKEN not in str(info.value)


def test_offline_mode_and_missing_token_fail_before_any_request(
    hub, export_dir, monkeypatch, tmp_path
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubError, match="no Hugging Face token") as info:
        push_folder(export_dir, REPO, endpoint=hub.url)
    assert info.value.reason == "no-token"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE") as info:
        push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert info.value.reason == "offline"
    with pytest.raises(HubError, match="needs a namespace"):
        push_folder(export_dir, "tiny-pruned", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_dry_run_lists_files_and_sizes_without_requests(hub, export_dir):
    result = push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url, dry_run=True)
    assert result.files == list_files(export_dir) and result.token_found
    text = result.summary()
    assert "dry run: would upload" in text and "README.md" in text and TOKEN not in text
    assert hub.requests == []


def test_cli_export_and_push(hub, tmp_path, monkeypatch, capsys):
    from fbnprune.cli import main

    run_dir, _ = make_run(tmp_path, layouts=("padded",))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = tmp_path / "export"
    args = ["export", str(run_dir), "--out", str(out), "--push-to-hub", REPO]
    assert main([*args, "--dry-run"]) == 0
    assert hub.requests == []
    assert main([*args, "--commit-message", "via cli"]) == 0  # reuses the export
    printed = capsys.readouterr().out
    assert "up to date, reused" in printed and f"to {hub.url}/{REPO}" in printed
    assert hub.commits[-1]["summary"] == "via cli"
    assert hub.files() == {n: (out / n).read_bytes() for n in list_files(out)}
    assert f'from_pretrained("{REPO}")' in hub.files()["README.md"].decode()
    assert_no_token_anywhere(hub, printed, folder=out)


def test_transformers_push_to_hub_reaches_the_same_server(hub, monkeypatch):
    """``model.push_to_hub`` talks to the loopback Hub too, once pointed at it: transformers
    keeps one shared ``HfApi`` whose endpoint was fixed when ``HF_ENDPOINT`` was read."""
    import transformers.utils.hub as transformers_hub
    from conftest import tiny_model
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(transformers_hub, "_hf_api", HfApi(endpoint=hub.url))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    tiny_model("llama").push_to_hub(REPO, token=TOKEN, commit_message="from transformers")
    assert {"model.safetensors", "config.json", "README.md"} <= set(hub.files())
    assert_no_token_anywhere(hub)
