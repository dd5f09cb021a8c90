"""Stable identities for requests: the derived seed and the request key.

The request key is what "the same job" means: the service and account it is paid on, the
model, the normalised request body, and a concrete seed, with local images identified by their
content hash rather than their path (a moved file is the same input; an edited file at the same
path is not). Caching, the submission ledger and de-duplication all use it; the service is in
it so that a free dry run on the emulator and the same request on the real service (or on
another account) never reconnect to each other's predictions.

Seed -1 is resolved to a concrete seed derived from the request and an optional `variant`. It is
as good as random for generation, it is recorded with every video, and it keeps the key stable
across re-runs: a random draw would make every re-run a new, paid job. Ask for another take of
the same request with a different `variant`.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from wan_tasks.api.media import file_sha256
from wan_tasks.api.models import MAX_SEED, MODEL_ID, I2VRequest

KEY_VERSION = "wan-i2v-v1"


# Hashing a 30 MB image several times per video is wasteful, but a cache must never serve the
# old hash for new bytes: the key holds the inode and the change time too, which every write or
# replacement moves (unlike mtime and size, which `cp -p` or `touch -r` keep).
@lru_cache(maxsize=4096)
def _content_hash(
    path: str, device: int, inode: int, size: int, mtime_ns: int, ctime_ns: int
) -> str:
    return file_sha256(Path(path))


def content_hash(path: Path) -> str:
    st = os.stat(path)
    return _content_hash(
        str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
    )


def normalised_body(request: I2VRequest) -> dict[str, object]:
    """The submit body with local images replaced by `sha256:<hex>` of their bytes."""
    local = {name: f"sha256:{content_hash(path)}" for name, path in request.local_images().items()}
    return request.to_payload(**local)


def _digest(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(request: I2VRequest, variant: str = "", model: str = MODEL_ID) -> I2VRequest:
    """Resolve seed -1 deterministically from the request and `variant`; keep a concrete one."""
    if request.seed != -1:
        return request
    body = normalised_body(request)
    seed = int(_digest(KEY_VERSION, "seed", model, body, variant), 16) % (MAX_SEED + 1)
    return request.model_copy(update={"seed": seed})


def request_key(
    request: I2VRequest, *, service: str, model: str = MODEL_ID, attempt: int = 0
) -> str:
    """Identity of one paid job on one service and account (`WaveSpeedClient.service_id`).
    `attempt` > 0 names a deliberate resubmission."""
    if request.seed == -1:
        raise ValueError("seed: resolve -1 to a concrete seed (derive_seed) before keying")
    parts: list[object] = [KEY_VERSION, model, normalised_body(request)]
    if attempt:
        parts.append({"attempt": attempt})
    parts.append({"service": service})
    return _digest(*parts)


def legacy_request_key(request: I2VRequest, *, model: str = MODEL_ID, attempt: int = 0) -> str:
    """The key of releases before the service was part of it: read (never written) so that an
    upgrade reconnects to what an older run submitted instead of paying again."""
    parts: list[object] = [KEY_VERSION, model, normalised_body(request)]
    if attempt:
        parts.append({"attempt": attempt})
    return _digest(*parts)
