"""The declared public surface, the one error tree, and layers that work without Prefect."""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import wan_tasks
from wan_tasks import errors
from wan_tasks.emulator import Emulator

# Exceptions that never leave their module (the emulator's connection-drop and bad-body signals, the
# manifest parser's internal duplicate-key marker, SeaweedFS's port race), caught where raised.
PRIVATE_EXCEPTIONS = {"BadBody", "Dropped", "_DuplicateKeyError", "_PortTaken"}


def all_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.walk_packages(wan_tasks.__path__, "wan_tasks.")
        if not m.name.endswith("__main__")
    )


def test_all_is_sorted_unique_and_every_name_resolves() -> None:
    names = wan_tasks.__all__
    assert len(names) == len(set(names))
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in names:
        assert getattr(wan_tasks, name) is not None, name
    assert set(names) <= set(dir(wan_tasks))
    with pytest.raises(AttributeError):
        _ = wan_tasks.no_such_name  # type: ignore[attr-defined]


def test_every_error_of_the_package_is_exported_and_under_one_root() -> None:
    exported = set(wan_tasks.__all__)
    for module_name in all_modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != module_name or name in PRIVATE_EXCEPTIONS:
                continue
            where = f"{module_name}.{name}"
            assert issubclass(obj, errors.WanTasksError), f"{where} is not a WanTasksError"
            assert obj.__module__ == "wan_tasks.errors", f"{name} is defined outside errors.py"
    for name in errors.__all__:
        if name[0].isupper():
            assert name in exported, f"{name} is not exported from wan_tasks"


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n[0].isupper()])
def test_every_error_pickles_with_its_state(name: str) -> None:
    cls = getattr(errors, name)
    kwargs = {"retryable": True} if cls is errors.ArchiveError else {}
    err = cls("what went wrong", **kwargs)
    err.extra = "kept"  # state set after construction survives too
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.extra == "kept"
    assert back.retryable == err.retryable


def test_retryable_is_one_question() -> None:
    assert errors.is_retryable(errors.TaskFailedError("x", task_code=5003))
    assert not errors.is_retryable(errors.TaskFailedError("x", task_code=1401))
    assert errors.is_retryable(errors.SubmissionNotFoundError("x"))
    assert not errors.is_retryable(errors.SubmissionUncertainError("x"))
    assert errors.is_retryable(errors.ArchiveError("x", retryable=True))
    assert not errors.is_retryable(ValueError("not ours"))


def test_importing_the_client_imports_neither_prefect_nor_boto3() -> None:
    code = textwrap.dedent("""
        import sys, wan_tasks
        from wan_tasks import WaveSpeedClient, I2VRequest, PollPolicy, WaveSpeedError
        print([m for m in ("prefect", "boto3", "botocore") if m in sys.modules])
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


# An import hook that refuses Prefect: the client and the core layer must work without it.
_NO_PREFECT = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" or name.startswith("prefect."):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Refuse())
"""


def run_without_prefect(emulator: Emulator, body: str) -> dict[str, object]:
    code = _NO_PREFECT + textwrap.dedent(body)
    env = {
        "WAVESPEED_API_KEY": emulator.api_key,
        "WAVESPEED_BASE_URL": emulator.base_url,
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_the_client_layer_submits_and_waits_without_prefect(emulator: Emulator) -> None:
    result = run_without_prefect(
        emulator,
        """
        import json, sys
        try:
            import prefect  # noqa
            raise SystemExit("the hook did not block prefect")
        except ImportError:
            pass
        from pathlib import Path
        import wan_tasks
        from wan_tasks import I2VRequest, PollPolicy, WaveSpeedClient
        with WaveSpeedClient() as client:
            image = str(Path(wan_tasks.__file__).parent / "assets" / "sample.png")
            sub = client.submit(I2VRequest(image=image, prompt="no prefect here", seed=3))
            done = client.wait(sub.prediction.id, timeout=120,
                               poll=PollPolicy(first_poll_after=0.2, min_interval=0.2))
        print(json.dumps({"status": str(done.status.value), "outputs": len(done.outputs),
                          "prefect": "prefect" in sys.modules}))
    """,
    )
    assert result == {"status": "completed", "outputs": 1, "prefect": False}
    assert emulator.stats()["submissions"] == 1


def test_the_core_submits_once_and_reconnects_without_prefect(
    emulator: Emulator, tmp_path: object
) -> None:
    result = run_without_prefect(
        emulator,
        f"""
        import json, sys
        from pathlib import Path
        import wan_tasks
        from wan_tasks import I2VRequest, WaveSpeedClient
        from wan_tasks.core.identity import derive_seed, request_key
        from wan_tasks.core.ledger import FileLedger
        from wan_tasks.core.submit import submit_once
        ledger = FileLedger(Path({str(tmp_path)!r}) / "ledger")
        with WaveSpeedClient() as client:
            image = str(Path(wan_tasks.__file__).parent / "assets" / "sample.png")
            first = submit_once(client, derive_seed(I2VRequest(image=image, prompt="once")),
                                ledger=ledger, settle_s=(0.2,))
            again = submit_once(client, derive_seed(I2VRequest(image=image, prompt="once")),
                                ledger=ledger, settle_s=(0.2,))
            # The crash window: the service took the task, the id never reached the ledger.
            lost = derive_seed(I2VRequest(image=image, prompt="crash window"))
            payload = client.prepare(lost)
            key = request_key(lost, service=client.service_id)
            ledger.record_intent(key, client.ops.model, payload)
            accepted = client.submit_payload(payload)
            found = submit_once(client, lost, ledger=ledger, settle_s=(0.2,))
        print(json.dumps({{"same": first.prediction_id == again.prediction_id,
                          "reconciled": found.prediction_id == accepted.id,
                          "prefect": "prefect" in sys.modules}}))
    """,
    )
    assert result == {"same": True, "reconciled": True, "prefect": False}
    assert emulator.stats()["submissions"] == 2  # "once" once, "crash window" once
