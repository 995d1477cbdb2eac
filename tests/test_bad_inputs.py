"""The bad-input corpus (tests/bad_inputs/*.yaml, one case per file): every case must fail with a non-zero
exit status and one clear line ``derd <command>: <message>`` that names the offending key/file/value and
the fix, print no traceback (unless ``--debug``), and leave every file that existed before untouched.
(A case with ``exit_code: 0`` is an input the run survives with a warning: its ``expect`` is in the log.)

Case file keys:
  name, description        what the case is and why it matters
  params_patch             dotted keys applied to tests/pipeline_profile.MICRO (no validation; "{root}"
                           in a string becomes the project folder)
  params_text              the params file verbatim instead (YAML or garbage)
  setup                    list of {do: <action>, ...} run in the project folder (see SETUP below)
  command                  {cli: [subcommand, ...]} run in-process through pipelines.cli.main, with
                           ``standin: <name>`` replacing the stage's Prefect flow by a library call (STANDINS),
                           ``patch: <name>`` a fault injected while it runs (PATCHES), ``subprocess: true``
                           a real process (``env`` added to its environment), ``params: false`` no --params
  expect                   substrings of the message (of the log too when exit_code is 0)
  exit_code                the expected exit status
  absent                   paths (relative to the project) that must not exist afterwards
"""
from __future__ import annotations

import copy
import errno
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_profile import MICRO

from pipelines import cli

REPO = Path(__file__).resolve().parent.parent
CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))


# ---------------------------------------------------------------- params
def _params(case: dict, root: Path) -> Path:
    path = root / "params.yaml"
    if "params_text" in case:
        text = case["params_text"]
        path.write_bytes(text.encode("latin-1") if case.get("params_bytes") else text.encode())
        return path
    params = copy.deepcopy(MICRO)
    for key, value in (case.get("params_patch") or {}).items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.replace("{root}", str(root)) if isinstance(value, str) else value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _cfg(root: Path):
    from derd import config

    return config.parse(yaml.safe_load((root / "params.yaml").read_text()))


def _info(dataset: str = "digits", image_size: int = 8):
    from derd import data
    from derd.config import Data

    return data.info(Data(name=dataset, image_size=image_size))


def _classifier(arch: str = "small_cnn", width: int = 4, dataset: str = "digits", classes: int | None = None):
    from derd.models import build_model

    info = _info(dataset)
    c, h, _ = info.shape
    return build_model(arch, c, classes or info.num_classes, info.mean, info.std, image_size=h, width=width)


# ---------------------------------------------------------------- setup actions
class _Payload:
    """Unpickling this would create the marker folder: a checkpoint that runs code when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _checkpoint(root: Path, step: dict) -> None:
    path = root / step["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = step["kind"]
    state = _classifier().state_dict()
    if kind == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "pickled_model":
        torch.save(_classifier(), path)
    elif kind == "code":
        torch.save({"weights": _Payload(str(root / step["marker"]))}, path)
    elif kind == "wrong_arch":
        torch.save(_classifier("small_resnet").state_dict(), path)
    elif kind == "wrong_classes":
        torch.save(_classifier(classes=5).state_dict(), path)
    elif kind == "nan":
        state = {k: v.clone() for k, v in state.items()}
        first = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
        state[first].view(-1)[0] = float("nan")
        torch.save(state, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "note": "weights went elsewhere"}, path)
    elif kind == "valid":
        torch.save(state, path)
    else:
        raise ValueError(kind)


def _teacher_artifacts(root: Path, step: dict) -> None:
    from derd.artifacts import save_artifact
    from derd.runtime import Paths

    for role in ("natural", "robust"):
        save_artifact(Paths(root).teacher(role), _classifier().state_dict(),
                      {"role": role, "arch": "small_cnn", "width": 4, "dataset": "digits", "num_classes": 10,
                       "shape": [1, 8, 8]})


def _student_artifact(root: Path, step: dict) -> None:
    from derd.artifacts import save_artifact
    from derd.runtime import Paths

    dataset = step.get("dataset", "digits")
    info = _info(dataset)
    save_artifact(Paths(root).student("derd", 0), _classifier(dataset=dataset).state_dict(),
                  {"method": "derd", "seed": 0, "arch": "small_cnn", "width": 4, "dataset": dataset,
                   "num_classes": info.num_classes, "shape": list(info.shape)})


def _generator_artifact(root: Path, step: dict) -> None:
    from derd.artifacts import save_artifact
    from derd.models import build_generator
    from derd.runtime import Paths

    info = _info(step.get("dataset", "digits"))
    g = MICRO["stage1"].get("generator", {})
    arch, nz, width = g.get("arch", "dafl"), g.get("nz", 100), g.get("width")
    save_artifact(Paths(root).generator("natural"), build_generator(arch, nz, info.shape, width).state_dict(),
                  {"arch": arch, "nz": nz, "width": width, "shape": list(info.shape), "dataset": info.name,
                   "num_classes": info.num_classes})


def _file(root: Path, step: dict) -> None:
    path = root / step["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(step.get("text", ""))


def _remove(root: Path, step: dict) -> None:
    (root / step["path"]).unlink()


SETUP = {"checkpoint": _checkpoint, "teacher_artifacts": _teacher_artifacts, "student_artifact": _student_artifact,
         "generator_artifact": _generator_artifact, "file": _file, "remove": _remove}


# ---------------------------------------------------------------- library stand-ins for the Prefect flows
def _load(params: str):
    from derd import config

    return config.load(params)


def _teachers(params: str, root: str) -> dict:
    from derd import teachers

    return teachers.run(_load(params), Path(root))


def _fetch_data(params: str, root: str) -> str:
    from derd import data

    return data.load(_load(params).data).info.name


def _evaluate_models(params: str, root: str) -> list:
    from derd import data
    from derd.evaluation import evaluate

    cfg = _load(params)
    return evaluate.models_to_evaluate(cfg, Path(root), data.load(cfg.data), torch.device("cpu"))


def _load_generator(params: str, root: str):
    from derd.stage1 import warmup

    return warmup.load_generator(_load(params), Path(root))


def _save_teacher(params: str, root: str) -> None:
    from derd.artifacts import save_artifact
    from derd.runtime import Paths

    save_artifact(Paths(Path(root)).teacher("natural"), _classifier(width=8).state_dict(), {"arch": "small_cnn"})


def _track_stage(params: str, root: str) -> dict:
    from pipelines import tracking

    return tracking.log_stage(_load(params), Path(root), "teachers", {"clean_acc": 0.5}, 1.0)


class _NaNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def _nan_logits(params: str, root: str) -> None:
    """A model whose logits are NaN: no example may count as correct, clean or attacked."""
    from derd.attacks import FGSM, robust_flags

    model = _NaNNet()
    x = torch.rand(12, 1, 8, 8)
    y = model.fc(x.flatten(1)).argmax(1)  # labels argmax(NaN) could otherwise match
    for attack in (None, FGSM(model, 0.1)):
        flags = robust_flags(model, attack, x, y, batch_size=5)
        if flags.shape != (12,) or flags.any():
            raise SystemExit(f"NaN logits counted as correct: {flags.tolist()}")


STANDINS = {"teachers": _teachers, "fetch_data": _fetch_data, "evaluate_models": _evaluate_models,
            "load_generator": _load_generator, "save_teacher": _save_teacher, "track_stage": _track_stage,
            "nan_logits": _nan_logits}


# ---------------------------------------------------------------- injected faults
def _enospc_replace(monkeypatch) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(src).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _enospc_write(monkeypatch) -> None:
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith(".tmp"):
            real(self, bytes(memoryview(data)[: len(memoryview(data)) // 2]))  # the disk filled up half-way
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


PATCHES = {"enospc_replace": _enospc_replace, "enospc_write": _enospc_write}


# ---------------------------------------------------------------- the test
def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    saved = dict(os.environ)  # main() sets Prefect defaults with setdefault
    torch.set_num_threads(1)
    # Prefect's import puts a console handler on the root logger, bound to the stderr of the test that imported
    # it (closed afterwards); caplog sees the records either way
    root_logger = logging.getLogger()
    monkeypatch.setattr(root_logger, "handlers", [h for h in root_logger.handlers if "prefect" not in type(h).__module__])
    yield root
    os.environ.clear()
    os.environ.update(saved)


def _run(case: dict, root: Path, params: Path, capsys, caplog, monkeypatch, debug: bool = False) -> tuple[int, str, str]:
    command = case["command"]
    argv = [str(a).replace("{root}", str(root)) for a in command["cli"]]
    if command.get("params", True):
        argv += ["--params", str(params)]
    if command.get("root", True) and argv[0] not in ("preset",):
        argv += ["--root", str(root)]
    if command.get("subprocess"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in (command.get("env") or {}).items()}}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                              cwd=root, env=env, timeout=120, check=False)
        return proc.returncode, proc.stdout, proc.stderr
    if "standin" in command:
        import pipelines.flows

        standin = STANDINS[command["standin"]]
        monkeypatch.setattr(pipelines.flows, f"{argv[0]}_flow", lambda params, root: standin(params, root))
    if "patch" in command:
        PATCHES[command["patch"]](monkeypatch)
    for key, value in (command.get("env") or {}).items():
        monkeypatch.setenv(key, str(value))
    caplog.set_level(logging.INFO)
    with caplog.at_level(logging.INFO):
        rc = cli.main((["--debug"] if debug else []) + argv)
    out = capsys.readouterr()
    return rc, out.out, out.err + caplog.text


@pytest.mark.parametrize("case_file", CASES, ids=lambda p: p.stem)
def test_bad_input(case_file, project, capsys, caplog, monkeypatch):
    case = yaml.safe_load(case_file.read_text())
    assert set(case) <= {"name", "description", "params_patch", "params_text", "params_bytes", "setup", "command",
                         "expect", "exit_code", "absent"}, f"{case_file.name}: unknown case keys"
    assert case["name"] == case_file.stem and case.get("description")
    root = project
    params = _params(case, root)
    for step in case.get("setup") or []:
        SETUP[step["do"]](root, step)
    before = _snapshot(root)

    rc, out, err = _run(case, root, params, capsys, caplog, monkeypatch)

    assert rc == case["exit_code"], f"exit {rc}, expected {case['exit_code']}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, f"a traceback leaked:\n{out}\n{err}"
    command = case["command"]["cli"][0]
    if case["exit_code"] == 0:
        message = out + err
    else:
        prefix = f"derd {command}: "
        lines = err.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert len(starts) == 1, f"expected exactly one line starting {prefix!r}:\n{err}"
        message = lines[starts[0]]
        for line in lines[starts[0] + 1:]:  # a config error lists further problems on indented lines
            if not line.startswith("  "):
                break
            message += "\n" + line
    for text in case["expect"]:
        assert str(text).replace("{root}", str(root)) in message, f"{text!r} not in {message!r}"
    after = _snapshot(root)
    damaged = [p for p, digest in before.items() if after.get(p) != digest]
    assert not damaged, f"earlier files changed or vanished: {damaged}"
    leftovers = [p for p in after if p.endswith(".tmp")]
    assert not leftovers, f"temp files left behind: {leftovers}"
    for rel in case.get("absent") or []:
        assert not (root / rel).exists(), f"{rel} exists: the input was executed"


def test_corpus_is_large_and_names_are_unique():
    names = [yaml.safe_load(p.read_text())["name"] for p in CASES]
    assert len(names) >= 32 and len(set(names)) == len(names)


def test_debug_shows_the_traceback(project, capsys):
    """``derd --debug <command>`` re-raises instead of printing one line."""
    params = project / "params.yaml"
    params.write_text("stage2:\n  lambda_rob: -1\n")
    from derd.config import ConfigError

    with pytest.raises(ConfigError, match="stage2.lambda_rob"):
        cli.main(["--debug", "teachers", "--params", str(params), "--root", str(project)])
    assert cli.main(["teachers", "--params", str(params), "--root", str(project)]) == 2


def test_unexpected_errors_become_one_line(project, capsys, monkeypatch):
    """An exception type main() does not know still ends as one line with the --debug hint, exit 1."""
    import pipelines.flows

    params = _params({}, project)

    def broken(params, root):
        raise KeyError("surprise")

    monkeypatch.setattr(pipelines.flows, "report_flow", broken)
    rc = cli.main(["report", "--params", str(params), "--root", str(project)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == "derd report: KeyError: 'surprise' (rerun as `derd --debug report` for the traceback)"
