"""Building and loading the C++ training steps (bench_core.native); their results are tested in test_manual.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_core import native

pytestmark = pytest.mark.usefixtures("fresh_fast_paths")

TINY = 'extern "C" int bench_core_tiny() { return 7; }\n'  # compiles in a second: no torch headers


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _source(tmp_path: Path, text: str = TINY, name: str = "tiny.cpp") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _needs_compiler() -> str:
    cxx = native.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    return cxx


def test_the_operators_load_and_run_here():
    """This project's machines have a compiler: the C++ steps must be in use, not quietly off."""
    _needs_compiler()
    assert native.warm_up(), native._state["failed"]
    assert native.is_ready()
    assert native._state["library"].exists()
    for name in ("batchensemble_layers", "first_layer_grads", "vectorized", "plain"):
        assert hasattr(torch.ops.bench_core, name)


def test_a_build_is_kept_and_not_made_again(tmp_path, cache, monkeypatch):
    _needs_compiler()
    source = _source(tmp_path)
    path = native.build(source)
    assert path.parent == cache and path.exists()
    assert os.listdir(cache) == [path.name], "no temporary file left behind"

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compile)
    assert native.build(source) == path


def test_the_librarys_name_changes_with_its_source_torch_and_compiler(tmp_path, cache, monkeypatch):
    a, b = _source(tmp_path), _source(tmp_path, TINY.replace("7", "8"), "tiny2.cpp")
    assert native.library_path(a, "g++") != native.library_path(b, "g++")
    assert native.library_path(a, "g++") != native.library_path(a, "clang++")
    first = native.library_path(a, "g++")
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert native.library_path(a, "g++") != first
    assert native.library_path(a, "g++").parent == cache


def test_the_cache_defaults_to_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(native.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "bench_core" / "native"


def test_a_compile_error_is_one_line_naming_it_and_leaves_nothing(tmp_path, cache):
    _needs_compiler()
    source = _source(tmp_path, "#error this source is broken\n", "broken.cpp")
    with pytest.raises(native.NativeBuildError, match=r"failed: .*this source is broken") as info:
        native.build(source)
    assert "\n" not in str(info.value)
    assert os.listdir(cache) == []


def test_a_failing_compiler_and_no_compiler_are_reported(tmp_path, cache, monkeypatch):
    source = _source(tmp_path)
    false = shutil.which("false") or pytest.skip("no `false` command here")
    with pytest.raises(native.NativeBuildError, match=r"false failed: exit status 1"):
        native.build(source, cxx=false)
    with pytest.raises(native.NativeBuildError, match=r"could not run"):
        native.build(source, cxx=str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native.compiler() is None
    with pytest.raises(native.NativeBuildError, match=r"no C\+\+ compiler found \(set CXX\)"):
        native.build(source)


def test_cxx_names_the_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/opt/my/c++")
    assert native.compiler() == "/opt/my/c++"


def test_a_build_that_fails_in_a_process_warns_once_and_turns_them_off(tmp_path, cache):
    """In a fresh process (a loaded library cannot be unloaded): a broken compiler, the Python steps."""
    code = (
        "import warnings, torch\n"
        "from bench_core import native, manual\n"
        "from bench_core.models import build_model\n"
        "from bench_core.config import ModelConfig\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    assert native.warm_up() is False and native.ops() is None\n"
        "    model = build_model('classic', ModelConfig(hidden=4, ensemble_size=2), 6, 3)\n"
        "    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])\n"
        "    manual.forward_backward(model, x, y, 'mean')\n"
        "print(len(seen), seen[0].message)\n"
    )
    false = shutil.which("false") or pytest.skip("no `false` command here")
    env = dict(os.environ, CXX=false, PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop(native.ENV_SWITCH, None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"1 C++ training steps are off (NativeBuildError: {false} failed: exit status 1)")


def test_switched_off_they_are_neither_built_nor_used(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled()
    assert native.ops() is None and native.warm_up() is False
    assert native.is_ready(), "nothing to wait for"


def test_the_build_command_targets_torchs_headers_and_abi():
    cmd = native.build_command("g++", Path("a.cpp"), Path("a.so"))
    torch_dir = Path(torch.__file__).parent
    assert cmd[0] == "g++" and "-std=c++20" in cmd and "-shared" in cmd
    assert str(torch_dir / "include") in cmd
    assert f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}" in cmd
    assert cmd[cmd.index("-o") + 1] == "a.so"
    assert "-ffp-contract=fast" in cmd and "-fopenmp" not in cmd
    assert "-fopenmp" in native.build_command("g++", Path("a.cpp"), Path("a.so"), openmp=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built with OpenMP on Linux only")
def test_the_library_is_built_with_openmp_on_linux(tmp_path, cache):
    _needs_compiler()
    path = native.build(_source(tmp_path))
    assert path == native.library_path(_source(tmp_path), openmp=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built with OpenMP on Linux only")
def test_a_compiler_without_openmp_builds_it_without_and_keeps_that(tmp_path, cache, monkeypatch):
    """A compiler that refuses -fopenmp (clang without libomp): the library without OpenMP, kept as the build."""
    real = _needs_compiler()
    wrapper = tmp_path / "no-openmp-c++"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "error: unsupported option -fopenmp" >&2; exit 1; }; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    source = _source(tmp_path)
    path = native.build(source, cxx=str(wrapper))
    assert path == native.library_path(source, str(wrapper), openmp=False) and path.exists()
    assert os.listdir(cache) == [path.name], "the failed OpenMP build left nothing"
    assert native.library_path(source, str(wrapper)) == path, "found as the build from now on"

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compile)
    assert native.build(source, cxx=str(wrapper)) == path


def test_a_cache_that_cannot_be_written_is_reported(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker / "native"))
    expected = r"cannot write to .*a-file/native \(Not a directory; set BENCH_NATIVE_CACHE\)"
    with pytest.raises(native.NativeBuildError, match=expected):
        native.build(_source(tmp_path), cxx="c++")
