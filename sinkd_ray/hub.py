"""Is the Hugging Face hub reachable? Asked once, in a few seconds, before a hub id or hub dataset is fetched:
without it, transformers and datasets retry for ~30 s and then report "not found" instead of "no network"."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_HINT = (
    "pass a local directory (save_pretrained / a GLUE copy via --data-dir), or an offline model: "
    "offline:all-mpnet-base-v2, offline:all-minilm-l6-v2, offline:smollm2-135m"
)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub's endpoint ($HF_ENDPOINT) within ``timeout`` seconds. Behind an HTTP(S) proxy
    the direct connection says nothing, so it counts as reachable; HF_HUB_OFFLINE=1 counts as unreachable."""
    if _offline_mode():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def no_network_message(what: str) -> str:
    offline = " (HF_HUB_OFFLINE is set)" if _offline_mode() else ""
    return f"no network access to the Hugging Face hub{offline} to fetch {what} — {OFFLINE_HINT}"
