"""`compress push` and `export --push-to-hub` end to end against a fake Hub on 127.0.0.1.

The fake answers the endpoints huggingface_hub calls to create a repo and a branch, read a
model's card, and commit (validate-yaml, preupload, commit). Preupload answers "regular" for
every file, so contents arrive base64 in the commit's NDJSON and no LFS/Xet server is needed;
it also gives the git oid of files already on the branch, as the Hub does, so a push of
unchanged files commits nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from huggingface_hub import constants
from transformers import AutoTokenizer

from compress.cli import main
from compress.reference import MODEL_DIR
from exporters.model_card import base_model_id, model_card
from tiny import tiny_model

FAST = ["--calib-samples", "8", "--seq-len", "32", "--eval-windows", "2"]
TOKEN = "hf_" + "Fake0Token1For2Tests3Only4xx" + "q" * 6
REPO = "acme/slim"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(ThreadingHTTPServer):
    """Repos as {repo: {branch: (head sha, {path: bytes})}}; `commits` lists every commit that landed."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.reset()

    def reset(self):
        self.repos: dict[str, dict] = {}
        self.private: dict[str, bool] = {}
        self.commits: list[dict] = []
        self.cards: dict[str, dict] = {}  # model_info answers: repo -> cardData
        self.auth: set = set()  # Authorization headers seen
        self.unexpected: list[str] = []
        self.bad_token = False  # every request answered 401
        self.commit_fault = None  # None, "drop" (mid-upload, nothing lands) or "lost" (lands, no answer)
        self.commit_conflict = False

    def create_repo(self, repo: str):
        self.repos[repo] = {"main": ("0" * 40, {})}


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _answer(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self, limit: int | None = None) -> bytes:
        n = int(self.headers.get("Content-Length", 0))
        return self.rfile.read(n if limit is None else min(n, limit))

    def _route(self, method: str):
        hub, path = self.server, unquote(urlsplit(self.path).path)
        hub.auth.add(self.headers.get("Authorization"))
        if hub.bad_token:
            self._body()
            return self._answer(401, {"error": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(self._body())
            repo = f"{req['organization']}/{req['name']}"
            if repo in hub.repos:
                return self._answer(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
            hub.create_repo(repo)
            hub.private[repo] = req.get("visibility") == "private"
            return self._answer(200, {"url": f"{hub.url}/{repo}"})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(self._body())["content"]
            yaml.safe_load(content.split("---")[1])  # the front matter parses, or the server thread shows why
            return self._answer(200, {"errors": [], "warnings": []})
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: optional, so not offered
            return self._answer(404, {"error": "not found"})
        if parts[:2] != ["api", "models"] or len(parts) < 4:
            hub.unexpected.append(f"{method} {path}")
            return self._answer(404, {"error": "not found"})
        repo, rest = "/".join(parts[2:4]), parts[4:]
        if method == "GET" and not rest and repo in hub.cards:
            return self._answer(200, {"id": repo, "cardData": hub.cards[repo]})
        if repo not in hub.repos:
            self._body()
            return self._answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        branches = hub.repos[repo]
        op, rev = (rest[0], "/".join(rest[1:])) if rest else ("", "")
        if method == "GET" and op == "revision":
            return self._answer(200, {"id": repo, "sha": branches[rev][0]})
        if method == "POST" and op == "branch":
            self._body()
            if rev in branches:
                return self._answer(409, {"error": "Reference already exists"})
            branches[rev] = branches["main"]
            return self._answer(200, {})
        if method == "POST" and op == "preupload":
            files = branches[rev][1]
            asked = json.loads(self._body())["files"]
            return self._answer(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": _git_oid(files[f["path"]]) if f["path"] in files else None} for f in asked]})
        if method == "POST" and op == "commit":
            if hub.commit_fault == "drop":  # read half the upload, then close the socket without an answer
                self._body(limit=int(self.headers.get("Content-Length", 0)) // 2)
                self.close_connection = True
                return None
            if hub.commit_conflict:
                self._body()
                return self._answer(409, {"error": "A commit has happened since. Please refresh and try again."})
            lines = [json.loads(line) for line in self._body().splitlines()]
            assert lines[0]["key"] == "header" and all(item["key"] == "file" for item in lines[1:]), lines
            added = {item["value"]["path"]: base64.b64decode(item["value"]["content"]) for item in lines[1:]}
            sha = hashlib.sha1(json.dumps([rev, len(hub.commits), sorted(added)]).encode()).hexdigest()
            branches[rev] = (sha, {**branches[rev][1], **added})
            hub.commits.append({"repo": repo, "revision": rev, "summary": lines[0]["value"]["summary"],
                                "files": added})
            if hub.commit_fault == "lost":  # committed, but the answer never arrives
                self.close_connection = True
                return None
            return self._answer(200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                                      "pullRequestUrl": None})
        hub.unexpected.append(f"{method} {path}")
        return self._answer(404, {"error": "not found"})


@pytest.fixture(scope="module")
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _point_at(mp: pytest.MonkeyPatch, hub: FakeHub):
    """huggingface_hub reads $HF_ENDPOINT and $HF_HUB_OFFLINE into `constants` once, at import
    (conftest sets HF_HUB_OFFLINE=1 for the suite), so the constants themselves are patched;
    HfApi() reads constants.ENDPOINT when it is made, the request hook reads HF_HUB_OFFLINE per call."""
    mp.setattr(constants, "ENDPOINT", hub.url)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def online(hub, monkeypatch):
    hub.reset()
    _point_at(monkeypatch, hub)
    return hub


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(hub, tmp_path_factory):
    """A tiny Qwen3 exported with `--push-to-hub` to the fake Hub (what landed is kept), then given
    an onnx/ folder. Push only moves bytes, so the ONNX files are placeholders here; real ONNX
    export is tested in test_onnx.py. The dense folder's card names a licence, as a real one would."""
    root = tmp_path_factory.mktemp("hub")
    dense, out = root / "dense", root / "slim"
    tiny_model("qwen3").save_pretrained(dense)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(dense)
    (dense / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n")
    with pytest.MonkeyPatch.context() as mp:
        hub.reset()
        _point_at(mp, hub)
        argv = ["export", "--model", str(dense), "--method", "flap", "--ratio", "0.4", "--out", str(out), *FAST]
        assert main([*argv, "--push-to-hub", "acme/exported"]) == 0
        landed = {"commits": hub.commits, "unexpected": hub.unexpected}
    (out / "onnx").mkdir()
    for name, data in {"model.onnx": b"\x08\x09onnx-graph", "model.onnx.data": bytes(range(256)) * 64,
                       "onnx_config.json": b'{"format": 1}\n'}.items():
        (out / "onnx" / name).write_bytes(data)
    return out, landed


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _one_error_line(capfd, *must_contain: str) -> str:
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert all(s in errors[0] for s in must_contain), errors[0]
    assert TOKEN not in out + err
    return errors[0]


def test_export_push_to_hub_commits_the_written_folder_once(exported):
    out, landed = exported
    assert landed["unexpected"] == []
    [commit] = landed["commits"]
    assert commit["repo"] == "acme/exported" and commit["revision"] == "main"
    files = dict(commit["files"])
    card = files.pop("README.md").decode()
    assert files == {p: b for p, b in _folder_bytes(out).items() if not p.startswith("onnx/")}
    assert "onnx" not in card.lower()  # exported without --onnx
    assert not (out / "README.md").exists()


def test_push_uploads_the_exact_bytes_and_a_card_and_leaves_the_folder_unchanged(exported, online, capfd, caplog):
    out, _ = exported
    before = {p: (b, (out / p).stat().st_mtime_ns) for p, b in _folder_bytes(out).items()}
    assert main(["push", str(out), "--repo", REPO, "--include-onnx"]) == 0
    [commit] = online.commits
    files = dict(commit["files"])
    card = files.pop("README.md").decode()
    assert files == _folder_bytes(out)  # every file, byte for byte, ONNX under onnx/
    assert {"onnx/model.onnx", "onnx/model.onnx.data", "onnx/onnx_config.json"} <= set(files)
    assert {p: (b, (out / p).stat().st_mtime_ns) for p, b in _folder_bytes(out).items()} == before
    assert online.auth == {f"Bearer {TOKEN}"} and online.unexpected == []

    meta = _front_matter(card)
    assert "base_model" not in meta and "Hub origin was not recorded" in card  # a local folder
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # from the dense folder's README
    assert {"compress", "pruned", "flap"} <= set(meta["tags"])
    report = json.loads((out / "report.json").read_text())
    rows = [f"| {q['text']} ({q['windows']} windows of 32 tokens spread over {q['text_tokens']:,} tokens, seed 0) | "
            f"{q['relation']} | {q['reference_perplexity']:.2f} | {q['perplexity']:.2f} |" for q in report["quality"]]
    for text in [*rows, "Calibrated on broad-calib (8 windows of 32 tokens spread over", "file calib-broad.txt",
                 "| equivalence | cpu | float64 |", "| files | cpu | float32 |",
                 f"| all parameters | {report['params']['total_before']:,} | {report['params']['total_after']:,} |",
                 "weight bytes (float32)", "| layers | heads | kv heads | mlp hidden |",
                 f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)',
                 f'AutoTokenizer.from_pretrained("{REPO}", trust_remote_code=False)',
                 "from compress.runtime.onnx_runner import OnnxRunner", 'runner = OnnxRunner(f"{path}/onnx", tokenizer=path)']:
        assert text in card, text
    printed = capfd.readouterr()
    assert f"pushed {out} to {online.url}/{REPO}/commit/" in printed.out
    assert TOKEN not in printed.out + printed.err + caplog.text


def test_push_leaves_onnx_out_unless_asked_and_commits_to_a_new_private_branch(exported, online, caplog):
    out, _ = exported
    assert main(["push", str(out), "--repo", REPO, "--private", "--revision", "v1"]) == 0
    [commit] = online.commits
    assert commit["revision"] == "v1" and online.private[REPO] and set(online.repos[REPO]) == {"main", "v1"}
    assert not [p for p in commit["files"] if p.startswith("onnx")]
    card = commit["files"]["README.md"].decode()
    assert "OnnxRunner" not in card and 'from_pretrained("acme/slim", revision="v1", trust_remote_code=True)' in card
    assert "add --include-onnx" in caplog.text


def test_a_bad_token_is_one_line_exit_2_and_lands_nothing(exported, online, capfd):
    out, _ = exported
    online.bad_token = True
    assert main(["push", str(out), "--repo", REPO]) == 2
    _one_error_line(capfd, f"push to {REPO} failed: HTTP 401", "Invalid credentials", "HF_TOKEN")
    assert online.commits == [] and not (out / "README.md").exists()


def test_an_existing_repo_is_reused_and_other_conflicts_are_one_line(exported, online, capfd):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    out, _ = exported
    online.create_repo(REPO)
    with pytest.raises(HfHubHTTPError, match="already created"):  # the 409 that exist_ok=True turns into reuse
        HfApi().create_repo(REPO)
    assert main(["push", str(out), "--repo", REPO]) == 0
    assert len(online.commits) == 1
    online.commit_conflict = True
    assert main(["push", str(out), "--repo", "acme/other"]) == 2
    _one_error_line(capfd, "HTTP 409: A commit has happened since")
    assert len(online.commits) == 1


def test_a_dropped_connection_lands_nothing_and_the_retry_lands_one_commit(exported, online, capfd):
    out, _ = exported
    online.commit_fault = "drop"
    assert main(["push", str(out), "--repo", REPO]) == 2
    _one_error_line(capfd, f"push to {REPO} failed:")
    assert online.commits == [] and online.repos[REPO]["main"][1] == {}
    online.commit_fault = None
    assert main(["push", str(out), "--repo", REPO]) == 0
    [commit] = online.commits
    sent = {p: b for p, b in commit["files"].items() if p != "README.md"}
    assert sent == {p: b for p, b in _folder_bytes(out).items() if not p.startswith("onnx/")}


def test_a_retry_after_a_lost_answer_does_not_commit_twice(exported, online, capfd):
    out, _ = exported
    online.commit_fault = "lost"
    assert main(["push", str(out), "--repo", REPO]) == 2
    _one_error_line(capfd, f"push to {REPO} failed:")
    online.commit_fault = None
    assert main(["push", str(out), "--repo", REPO]) == 0  # same bytes, card included: nothing to commit
    assert len(online.commits) == 1


def test_a_hub_base_is_named_with_its_licence(exported, online, tmp_path):
    out, _ = exported
    folder = shutil.copytree(out, tmp_path / "slim", ignore=shutil.ignore_patterns("onnx"))
    report = json.loads((folder / "report.json").read_text())
    (folder / "report.json").write_text(json.dumps({**report, "base_model": "acme/dense-7b"}))
    online.cards["acme/dense-7b"] = {"license": "mit"}
    assert main(["push", str(folder), "--repo", REPO]) == 0
    card = online.commits[0]["files"]["README.md"].decode()
    meta = _front_matter(card)
    assert meta["base_model"] == "acme/dense-7b" and meta["base_model_relation"] == "pruned"
    assert meta["license"] == "mit" and "(https://huggingface.co/acme/dense-7b)" in card


def test_a_readme_in_the_folder_is_the_card(exported, online, tmp_path, caplog):
    out, _ = exported
    folder = shutil.copytree(out, tmp_path / "slim", ignore=shutil.ignore_patterns("onnx"))
    (folder / "README.md").write_bytes(b"---\nlicense: mit\n---\n# my own words\n")
    assert main(["push", str(folder), "--repo", REPO]) == 0
    assert online.commits[0]["files"]["README.md"] == b"---\nlicense: mit\n---\n# my own words\n"
    assert "as the model card" in caplog.text


def test_offline_no_token_and_missing_onnx_are_one_line_without_leaking_the_token(exported, monkeypatch, capfd,
                                                                                  tmp_path):
    out, _ = exported
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # HF_HUB_OFFLINE=1 stays set, as for the whole suite
    assert main(["push", str(out), "--repo", REPO]) == 2
    _one_error_line(capfd, f"push to {REPO} failed: OfflineModeIsEnabled")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(out), "--repo", REPO]) == 2
    _one_error_line(capfd, "no Hugging Face token")
    folder = shutil.copytree(out, tmp_path / "slim", ignore=shutil.ignore_patterns("onnx"))
    assert main(["push", str(folder), "--repo", REPO, "--include-onnx"]) == 2
    _one_error_line(capfd, "has no ONNX model", "compress onnx")
    assert not (out / "README.md").exists()


def test_base_model_is_named_only_when_known_and_speed_is_shown_when_recorded(exported):
    out, _ = exported
    assert base_model_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B" and base_model_id("gpt2") == "gpt2"
    snapshot = "/home/me/.cache/huggingface/hub/models--TheOrg--Tiny-GGUF/snapshots/abc123/tiny.Q4_0.gguf"
    assert base_model_id(snapshot) == "TheOrg/Tiny-GGUF"
    assert base_model_id("/data/models/llama") is None and base_model_id("reference") is None
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    report["base_model"] = "/data/models/private-llama.gguf"
    report["speed"] = {"setup": "tiny on CPU, float32, batch 1", "rows": [
        {"engine": "pytorch", "model": m, "prefill_tok_s": p, "decode_tok_s": d, "bytes_per_token": b}
        for m, p, d, b in [("dense", 1000.0, 50.0, 4000), ("slim", 1500.0, 80.0, 2000)]], "bandwidth": 1e6, "batch": 1}
    card = model_card(report, config, REPO)
    assert "base_model" not in _front_matter(card) and "license" not in _front_matter(card)
    assert "a local GGUF file (`private-llama.gguf`)" in card and "/data/models" not in card
    assert "## Speed" in card and "| pytorch | slim | 1,500 | 80.0 | 1.50x | 1.60x | 2.00x | 80% | 16% |" in card
    assert card == model_card(report, config, REPO)  # deterministic: a re-push of the same folder is a no-op
    assert "onnxruntime_genai" not in model_card(report, config, REPO, onnx_dirs=("onnx",))
    assert 'og.Model(f"{path}/onnx")' in model_card(report, config, REPO, onnx_dirs=("onnx",), genai_dirs=("onnx",))


def test_card_says_what_quantized_onnx_weights_cost_and_lists_their_checks(exported):
    out, _ = exported
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    check = {"name": "onnx int4", "device": "cpu", "dtype": "float32", "max_abs_diff": 2e-7, "tolerance": 1e-4,
             "passed": True, "detail": "vs the slim model holding the graph's dequantized int4 weights"}
    report["onnx"] = {"float32-int4": [check]}
    report["onnx_quantization"] = {"float32-int4": {"windows": 16, "float_ppl": 20.0, "quantized_ppl": 21.5,
                                                    "kl": 0.0421, "agreement": 0.9}}
    card = model_card(report, config, REPO, onnx_dirs=("onnx-int4",))
    assert "## Use with onnxruntime (`onnx-int4/`)" in card and "perplexity 20.00 -> 21.50, KL 0.0421" in card
    assert "| onnx int4 | cpu | float32 |" in card
    plain = model_card(report, config, REPO, onnx_dirs=("onnx",))
    assert "MatMulNBits" not in plain and "| onnx int4 |" not in plain
