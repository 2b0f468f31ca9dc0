"""Push an exported folder to the Hugging Face Hub: one commit, with a model card from its report.

Everything goes up in one `create_commit` (upload_folder may split a folder into several commits
when hf_xet is installed), so a push that fails lands nothing and running it again is the retry;
files already on the Hub with the same content are skipped by huggingface_hub. Large files take
huggingface_hub's own LFS/Xet path. The card is added from memory: the folder is only read.
The token comes from $HF_TOKEN or `hf auth login`; it goes to huggingface_hub only and is cut out
of any error message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.errors import CompressError
from exporters.model_card import base_model_id, model_card

__all__ = ["push_folder"]

log = logging.getLogger(__name__)
DEFAULT_MESSAGE = "Upload slim model from compress"


def _is_onnx(path_in_repo: str) -> bool:
    top = path_in_repo.split("/")[0]
    return "/" in path_in_repo and (top == "onnx" or top.startswith("onnx-"))  # DIR/onnx, DIR/onnx-float16


def _is_gguf(path_in_repo: str) -> bool:
    return path_in_repo.endswith(".gguf")


def _optional(folder: Path, files: dict[str, Path], is_part, include: bool, what: str, make: str,
              flag: str) -> tuple[dict[str, Path], tuple[str, ...]]:
    """(the files to upload, the paths of the optional part among them): ONNX folders and GGUF files
    are large and go up only when asked for, and asking for one that is not there is an error."""
    part = tuple(p for p in files if is_part(p))
    if include and not part:
        raise CompressError(f"{folder} has no {what}: run `{make} {folder}` first, or push without {flag}")
    if include or not part:
        return files, part
    tops = sorted({p.split("/")[0] + "/" if "/" in p else p for p in part})
    log.warning(f"not uploading {', '.join(tops)} (add {flag} to push {'it' if len(tops) == 1 else 'them'})")
    return {p: f for p, f in files.items() if not is_part(p)}, ()


def _upload_files(folder: Path) -> dict[str, Path]:
    """Path in the repo -> local file, for every file of the folder (hidden files and caches left out)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                       for part in p.relative_to(folder).parts)}


def _base_card(base: str, api) -> dict:
    """The dense model's card metadata (for its licence): from the Hub for a Hub id, else from the
    README.md of the local folder (or beside the GGUF file) it was loaded from. {} when unknown."""
    from huggingface_hub.repocard import metadata_load

    hub_id = base_model_id(base)
    if hub_id and not Path(base).is_absolute():
        try:
            card = api.model_info(hub_id).card_data
        except Exception as e:  # the licence is optional: the card then says it is not known
            log.warning(f"licence of {hub_id} not read ({type(e).__name__}); the card does not name one")
            return {}
        return card.to_dict() if card else {}
    if base == "reference":
        from compress.reference import MODEL_DIR

        path = MODEL_DIR
    else:
        path = Path(base) if Path(base).is_dir() else Path(base).parent
    readme = path / "README.md"
    return (metadata_load(readme) or {}) if readme.is_file() else {}


def _one_line(e: Exception, token: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        text = f"HTTP {status}" + (f": {e.server_message}" if e.server_message else "")
        if status in (401, 403):
            text += " (is $HF_TOKEN, or the `hf auth login` token, valid with write access to this namespace?)"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split()).replace(token, "***")


def require_token() -> str:
    """The Hub token from $HF_TOKEN or the huggingface_hub login; checked before long work starts."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise CompressError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: Path, repo: str, private: bool = False, revision: str | None = None,
                include_onnx: bool = False, message: str = DEFAULT_MESSAGE, include_gguf: bool = False) -> str:
    """Create `repo` if needed (and the branch `revision`), then commit the folder and its card in
    one commit; returns the commit URL. ONNX folders go up only with include_onnx, GGUF files only
    with include_gguf."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder).resolve()
    if not (folder / "report.json").is_file() or not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: no report.json/config.json; not a folder written by `compress export`")
    files, onnx = _optional(folder, _upload_files(folder), _is_onnx, include_onnx, "ONNX model", "compress onnx",
                            "--include-onnx")
    files, gguf_files = _optional(folder, files, _is_gguf, include_gguf, "GGUF file", "compress gguf",
                                  "--include-gguf")
    onnx_dirs = tuple(sorted({p.split("/")[0] for p in onnx}))
    token = require_token()
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
    if "README.md" in files:
        log.warning(f"using {folder / 'README.md'} as the model card")
    else:
        report = json.loads((folder / "report.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        genai_dirs = tuple(d for d in onnx_dirs if f"{d}/genai_config.json" in files)
        card = model_card(report, config, repo, _base_card(str(report.get("base_model", "reference")), api),
                          onnx_dirs, revision, genai_dirs, gguf_files)
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    try:
        api.create_repo(repo, private=private or None, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.create_commit(repo, operations, commit_message=message, revision=revision)
    except Exception as e:  # HTTP errors, dropped connections, offline mode: one line, the token cut out
        raise CompressError(f"push to {repo} failed: {_one_line(e, token)}") from None
    return info.commit_url
