"""Backends from a config section, for jobs: `make_backend(config.backend, problems)`.

  kind="oracle"       reference solutions (`OracleBackend`, needs the problems)
  kind="replay"       a replay JSONL file (`backend.path`)
  kind="local"        the local lacax model (`lacax.hw.backends.local.LocalBackend.load`: `backend.path` ("" = the
                      embedded SmolLM2-135M-Instruct), `dtype`, `cache_policy`)
  kind="openai_http"  an OpenAI-compatible server (`lacax.hw.backends.openai_http`: `base_url`, `model`; the key
                      from the environment), e.g. `lacax serve`
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

KINDS = ("oracle", "replay", "local", "openai_http")


def make_backend(section: Mapping[str, Any], problems: Sequence[Any] = (), style: str = "chat",
                 system: str | None = None, model: Any = None):
  """The backend a config section names; `model` (a loaded lacax model) overrides loading for "local"."""
  kind = section.get("kind", "oracle")
  if kind == "oracle":
    from lacax.hw.backends.oracle import OracleBackend  # pylint: disable=g-import-not-at-top
    return OracleBackend(problems, style=style, system=system)
  if kind == "replay":
    from lacax.hw.backends.scripted import ReplayBackend  # pylint: disable=g-import-not-at-top
    if not section.get("path"):
      raise ValueError("backend.kind='replay' needs backend.path (a replay JSONL file)")
    return ReplayBackend.from_file(section["path"])
  if kind == "local":
    local = importlib.import_module("lacax.hw.backends.local")
    if model is not None:
      return local.LocalBackend(model)
    return local.LocalBackend.load(section.get("path") or None, dtype=section.get("dtype", "float32"),
                                   cache_policy=section.get("cache_policy", "full"))
  if kind == "openai_http":
    try:
      mod = importlib.import_module("lacax.hw.backends.openai_http")
    except ImportError as e:
      raise ValueError(f"backend.kind='openai_http' needs lacax.hw.backends.openai_http ({e})") from None
    if not section.get("base_url") or not section.get("model"):
      raise ValueError("backend.kind='openai_http' needs backend.base_url (e.g. http://127.0.0.1:8000/v1) and "
                       "backend.model")
    return mod.OpenAIHTTPBackend(section["base_url"], section["model"])
  raise ValueError(f"backend.kind={kind!r} must be one of {KINDS}")
