"""Weight sync from the local trainer to a served student.

After each optimizer step the trainer writes the new weights to a directory
that the student server can read, then this module requests every replica to load
them:

    lora  POST /v1/load_lora_adapter {lora_name, lora_path} under a new name per
          policy version; later requests select the weights with "model":
          lora_name. vLLM (--enable-lora, runtime LoRA updating) loads peft
          adapter directories, which the trainer writes when it trains LoRA and
          publishes adapters; the mopd model server loads adapters and full weights.
    disk  POST /update_weights_from_disk {model_path} (SGLang, or the mopd
          model server); the served name stays the same.

The sampler switches to the new name and version only after every replica
confirmed the load, so no sample is stamped with a version its weights do
not have.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import structlog

from mopd.backends.openai.client import Deployment
from mopd.backends.openai.sampler import OpenAISampler
from mopd.errors import BackendError

log = structlog.get_logger(__name__)

SyncMode = Literal["lora", "disk"]


class ServerWeightSync:
    """Publishes trainer weights to the student deployment.

    :param local_dir: directory this process writes version directories into.
    :param server_dir: the same directory under the path the server uses (a
        container mount); None means the server reads ``local_dir`` itself.
    :param keep_versions: version directories (and loaded adapters) to keep;
        older ones are deleted (and unloaded) after a publish.
    """

    def __init__(
        self,
        *,
        deployment: Deployment,
        sampler: OpenAISampler,
        mode: SyncMode,
        local_dir: Path,
        server_dir: str | None,
        keep_versions: int = 2,
        name_prefix: str = "mopd",
    ) -> None:
        self._deployment = deployment
        self._sampler = sampler
        self._mode = mode
        self._local_dir = local_dir
        self._server_dir = server_dir
        self._keep = max(keep_versions, 1)
        # A run-unique part keeps names distinct from adapters an earlier run left loaded.
        self._prefix = f"{name_prefix}-{secrets.token_hex(3)}"
        self._published: list[tuple[int, str, Path]] = []

    async def publish(self, *, version: int, save: Callable[[Path], Awaitable[None]]) -> None:
        """Write the weights of ``version`` with ``save``, load them on every replica, then switch the sampler.

        :raises BackendError: when a replica does not confirm the load.
        """
        # 1. Write the weights where the server can read them.
        directory = self._local_dir / f"v{version:06d}"
        if directory.exists():
            shutil.rmtree(directory)
        await save(directory)
        server_path = str(Path(self._server_dir) / directory.name) if self._server_dir else str(directory.resolve())

        # 2. Ask every replica to load them; only then switch the sampler.
        if self._mode == "lora":
            name = f"{self._prefix}-v{version}"
            await self._deployment.post_each("/v1/load_lora_adapter", {"lora_name": name, "lora_path": server_path},
                                             expect_json=False)
        else:
            name = self._sampler.current_model
            responses = await self._deployment.post_each("/update_weights_from_disk", {"model_path": server_path})
            for response in responses:
                _check_success(response.body, replica=response.replica, path=server_path)
        self._sampler.switch_model(model=name, version=version)
        log.info("weights_published", version=version, mode=self._mode, model=name, path=server_path,
                 replicas=len(self._deployment.replicas))

        # 3. Drop what is older than the versions kept.
        self._published.append((version, name, directory))
        while len(self._published) > self._keep:
            _, old_name, old_dir = self._published.pop(0)
            if self._mode == "lora" and old_name != name:
                await self._unload(old_name)
            shutil.rmtree(old_dir, ignore_errors=True)

    async def _unload(self, name: str) -> None:
        try:
            await self._deployment.post_each("/v1/unload_lora_adapter", {"lora_name": name}, expect_json=False)
        except BackendError as exc:
            # The server keeps serving the new adapter; an old one left loaded only costs memory.
            log.warning("adapter_unload_failed", model=name, reason=exc.reason, error=str(exc))


def _check_success(body: Any, *, replica: str, path: str) -> None:
    if isinstance(body, dict) and body.get("success") is False:
        raise BackendError("weight_update_failed",
                           f"{replica} did not load the weights in {path}: {body.get('message', body)}")
