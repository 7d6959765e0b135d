"""`--help` of scripts/setup, scripts/test and scripts/debian-install: their usage and exit
statuses, and nothing installed or run (the demo's and the benchmark's are in
test_demo_script.py and test_bench_smoke.py); the help of every script when it is called by a
path relative to another directory or through a symlink placed elsewhere; scripts/setup's
refusals (of options it does not know, and, when not root, to try apt-get), the packages it says
it installs, the dpkg run it (and scripts/bench) finishes before apt-get when one was
interrupted, its message on Ctrl-C, its repair of a .venv that does not work or whose install
did not finish and the pip it adds to a .venv made without one; scripts/debian-install's
refusal of a bad call and the policy-rc.d that keeps nginx from starting while it installs."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import wait_until

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize(("script", "usage"), [
    ("setup", "  scripts/setup [--tests]\n"),
    ("test", "  scripts/test [PYTEST_ARGUMENTS...]\n"),
    ("debian-install", "  scripts/debian-install [--caller NAME] [--nginx] [PACKAGE...]\n"),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_the_usage_and_runs_nothing(script: str, usage: str, flag: str) -> None:
    """setup refused --help as an unknown option (exit 2); test installed, linted and
    type-checked, then printed pytest's help."""
    result = subprocess.run([str(SCRIPTS / script), flag], capture_output=True, text=True,
                            timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert usage in result.stdout, result.stdout
    assert "\nExit status: 0 " in result.stdout, result.stdout
    assert "set -" not in result.stdout and "pytest [options]" not in result.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--tests", "--bogus"], ["--tests", "--help"]])
def test_setup_refuses_what_it_does_not_know_before_installing_anything(args: list[str]) -> None:
    """It read only its first argument: `--tests --bogus` (or a misplaced --help) installed."""
    result = subprocess.run([str(SCRIPTS / "setup"), *args], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.startswith("setup: "), result.stderr


@pytest.mark.parametrize("script", ["setup", "test", "bench", "demo", "debian-install"])
def test_help_works_from_another_directory_by_a_relative_path(script: str) -> None:
    """`./setup --help` in scripts/ (or any relative path): the script changes to the
    checkout's root first, after which "$0" named no file: sed failed (exit 2)."""
    result = subprocess.run([f"./{script}", "--help"], cwd=SCRIPTS, capture_output=True,
                            text=True, timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert f"  scripts/{script} [" in result.stdout, result.stdout
    assert "Exit status: 0 " in result.stdout, result.stdout


@pytest.mark.parametrize("script", ["setup", "test", "bench", "demo", "debian-install"])
@pytest.mark.parametrize("linked", ["the script", "the scripts directory"])
def test_help_works_through_a_symlink_placed_elsewhere(
        tmp_path: Path, script: str, linked: str) -> None:
    """`ln -s CHECKOUT/scripts/bench ~/bin/vc-bench` (or a link to scripts/), run by a path
    relative to yet another directory: the script took the link's directory's parent for the
    checkout, where no scripts/ is: sed failed (exit 2). (The demo prints its help before it
    changes directory; test_demo_script.py runs it to its end through a symlink.)"""
    (tmp_path / "bin").mkdir()
    (tmp_path / "elsewhere").mkdir()
    if linked == "the script":
        link = tmp_path / "bin" / f"vc-{script}"
        link.symlink_to(SCRIPTS / script)
    else:
        (tmp_path / "bin" / "vc-scripts").symlink_to(SCRIPTS)
        link = tmp_path / "bin" / "vc-scripts" / script
    result = subprocess.run([os.path.relpath(link, tmp_path / "elsewhere"), "--help"],
                            cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                            timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert f"  scripts/{script} [" in result.stdout, result.stdout
    assert "Exit status: 0 " in result.stdout, result.stdout


def setup_on_a_bare_path(place: Path) -> list[str]:
    """The command running a copy of scripts/setup in `place`, with a PATH (`place`/bin)
    holding only bash, readlink and apt-config: ffmpeg, fusermount3, mpv and python3 are
    missing. The copy stops before it looks at its checkout."""
    bin_dir, scripts = place / "bin", place / "scripts"
    for directory in (place, bin_dir, scripts):
        directory.mkdir(exist_ok=True)
        os.chmod(directory, 0o755)
    for script in ("setup", "debian-install"):
        shutil.copy(SCRIPTS / script, scripts)
    link_tools(bin_dir, "bash", "readlink", "apt-config")
    return ["env", f"PATH={bin_dir}", str(scripts / "setup")]


def link_tools(bin_dir: Path, *tools: str) -> None:
    """Links in `bin_dir` to the machine's `tools`."""
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)


def bench_on_a_bare_path(place: Path) -> list[str]:
    """The command running a copy of scripts/bench (and debian-install) in `place`, its setup
    a stub that succeeds, with a PATH (`place`/bin) holding only what bench runs up to its
    installs besides dpkg and apt-get (for the caller to stub)."""
    bin_dir, scripts = place / "bin", place / "scripts"
    bin_dir.mkdir(parents=True)
    scripts.mkdir()
    for script in ("bench", "debian-install"):
        shutil.copy(SCRIPTS / script, scripts)
    (scripts / "setup").write_text("#!/bin/sh\nexit 0\n")
    (scripts / "setup").chmod(0o755)
    link_tools(bin_dir, "bash", "readlink", "apt-config", "chmod", "rm")
    return ["env", f"PATH={bin_dir}", str(scripts / "bench")]


def test_setup_not_as_root_names_the_missing_packages_instead_of_failing_in_apt_get() -> None:
    """A PATH without ffmpeg, fusermount3, mpv and python3 (nor apt-get: nothing can be
    installed even if the script tried) makes them missing; a user then learned only apt-get's
    "Could not open lock file" (here: "apt-get: command not found", 127)."""
    user = [] if os.geteuid() != 0 else [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # Not tmp_path, nor the checkout itself (a clone under /root): closed to other users, such
    # as the one above.
    with tempfile.TemporaryDirectory() as place:
        result = subprocess.run([*user, *setup_on_a_bare_path(Path(place))],
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result
    assert result.stderr == ("setup: Debian packages are missing: ffmpeg fuse3 mpv python3-venv;"
                             " run this as root, or install them with apt-get\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="setup installs only as root")
def test_setup_as_root_names_the_packages_it_installs(tmp_path: Path) -> None:
    """Without --tests no nginx is needed, and the message ended with a space where
    nginx-light goes. Here apt-get fails at once (100, as it does without a network)."""
    command = setup_on_a_bare_path(tmp_path)
    (tmp_path / "bin" / "apt-get").write_text("#!/bin/sh\nexit 100\n")
    (tmp_path / "bin" / "apt-get").chmod(0o755)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (100, ""), result
    assert result.stdout == "setup: installing Debian packages: ffmpeg fuse3 mpv python3-venv\n"


def apt_config_with_dpkg_state(directory: Path, left: str) -> dict[str, str]:
    """An environment whose apt configuration (APT_CONFIG) puts dpkg's status in `directory`
    with the file `left` in its updates/ (a journal entry when its name is all digits)."""
    admin = directory / "dpkg"
    (admin / "updates").mkdir(parents=True)
    (admin / "status").touch()
    (admin / "updates" / left).write_text("Package: ffmpeg\nStatus: install ok unpacked\n")
    config = directory / "apt.conf"
    # No package caches: apt would write them, built from this status, into /var/cache/apt.
    config.write_text(f'Dir::State::status "{admin}/status";\n'
                      'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
    return {**os.environ, "APT_CONFIG": str(config)}


def logging_stubs(bin_dir: Path, log: Path) -> None:
    """dpkg and apt-get in `bin_dir` that log their arguments and DEBIAN_FRONTEND to `log`;
    dpkg succeeds, apt-get fails (100, as without a network)."""
    for tool, status in (("dpkg", 0), ("apt-get", 100)):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $* ($DEBIAN_FRONTEND)" >>{log}\n'
                        f"exit {status}\n")
        stub.chmod(0o755)


FINISHING = "dpkg --force-confdef --force-confold --configure -a (noninteractive)\n"
UPDATE = "apt-get update -qq (noninteractive)\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="setup installs only as root")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt's own check needs apt-get")
@pytest.mark.parametrize("left", ["0001", "tmp.i"], ids=["journal", "no journal"])
def test_setup_finishes_an_interrupted_dpkg_before_apt_get(tmp_path: Path, left: str) -> None:
    """A Ctrl-C (or a lost SSH session) during setup's apt-get install leaves entries in dpkg's
    journal, updates/ beside its status file; the next setup failed in apt-get: "dpkg was
    interrupted, you must manually run 'dpkg --configure -a' to correct the problem". Now it
    says so and runs that first, non-interactively. Here apt's configuration puts dpkg's
    status in tmp_path; the real apt-get calls the state interrupted or not (a file dpkg
    leaves whose name is not all digits is no journal entry); dpkg and apt-get on setup's
    PATH are stubs that log their calls."""
    env = apt_config_with_dpkg_state(tmp_path, left)
    interrupted = left.isdigit()
    check = subprocess.run(["apt-get", "check"], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
    assert ("dpkg was interrupted" in check.stderr) == interrupted, check

    command = setup_on_a_bare_path(tmp_path / "place")
    log = tmp_path / "calls.log"
    logging_stubs(tmp_path / "place" / "bin", log)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert (result.returncode, result.stderr) == (100, ""), result
    installing = "setup: installing Debian packages: ffmpeg fuse3 mpv python3-venv\n"
    if interrupted:
        assert result.stdout == ("setup: dpkg was interrupted during an earlier installation;"
                                 " finishing its work first (dpkg --configure -a)\n"
                                 + installing)
        assert log.read_text() == FINISHING + UPDATE
    else:
        assert (result.stdout, log.read_text()) == (installing, UPDATE)


@pytest.mark.skipif(os.geteuid() != 0, reason="bench installs only as root")
def test_bench_finishes_an_interrupted_dpkg_before_apt_get(tmp_path: Path) -> None:
    """As setup (above) for bench's own installation (rclone, httpfs2, curl): its apt-get
    failed on the journal an interrupted installation left (setup, which bench runs first,
    finishes it only when it installs something itself). Here setup is a stub that succeeds,
    and PATH holds only what bench runs up to apt-get."""
    env = apt_config_with_dpkg_state(tmp_path, "0001")
    command = bench_on_a_bare_path(tmp_path / "place")
    log = tmp_path / "calls.log"
    logging_stubs(tmp_path / "place" / "bin", log)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert result.returncode == 100, result
    assert result.stderr.startswith(
        "bench: dpkg was interrupted during an earlier installation; finishing its work first"
        " (dpkg --configure -a)\nbench: installing Debian packages: rclone httpfs2 curl"), result
    assert log.read_text() == FINISHING + UPDATE


def waiting_in(started: Path) -> str:
    """Shell lines that create `started`, then wait (touch and sleep need not be on PATH)."""
    return f'{shutil.which("touch")} "{started}"\nexec {shutil.which("sleep")} 60\n'


def run_with_ctrl_c(command: list[str], started: Path, what: str,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `command` in a session of its own and, once `started` exists (the command having
    not ended first), send its processes SIGINT, as a terminal does to its job on a Ctrl-C."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        wait_until(lambda: started.exists() or process.poll() is not None, timeout=30,
                   what=what)
        assert process.poll() is None, process.communicate()
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="setup installs only as root")
def test_ctrl_c_during_setup_says_to_run_it_again(tmp_path: Path) -> None:
    """A Ctrl-C ended setup without a word (the next run finishes what it left half-done,
    dpkg's interrupted installation included). It still ends by SIGINT, as before, for its
    caller. Here the Ctrl-C comes while apt-get (a stub that waits) installs."""
    command = setup_on_a_bare_path(tmp_path)
    started = tmp_path / "apt-get started"
    apt_get = tmp_path / "bin" / "apt-get"
    apt_get.write_text("#!/bin/sh\n" + waiting_in(started))
    apt_get.chmod(0o755)
    result = run_with_ctrl_c(command, started, "setup running apt-get")
    assert result.returncode == -signal.SIGINT, result
    assert result.stderr == "setup: interrupted; run it again to finish\n"


def debian_install_on_a_bare_path(place: Path) -> list[str]:
    """The command running a copy of scripts/debian-install in `place`, with a PATH
    (`place`/bin) holding only what it runs besides dpkg and apt-get (for the caller to stub)."""
    bin_dir, scripts = place / "bin", place / "scripts"
    bin_dir.mkdir(parents=True)
    scripts.mkdir()
    shutil.copy(SCRIPTS / "debian-install", scripts)
    link_tools(bin_dir, "bash", "readlink", "sed", "apt-config", "chmod", "rm")
    return ["env", f"PATH={bin_dir}", str(scripts / "debian-install")]


@pytest.mark.parametrize(("args", "error"), [
    (["--bogus", "curl"], "unknown option --bogus (see --help)"),
    (["curl", "-y"], "unknown option -y (see --help)"),  # not passed on to apt-get
    (["curl", "--caller"], "--caller needs a NAME"),
    ([], "no package to install (see --help)"),
    (["--caller", "setup"], "no package to install (see --help)"),
])
def test_debian_install_refuses_a_bad_call_before_installing_anything(
        tmp_path: Path, args: list[str], error: str) -> None:
    """A bad option, anywhere among the packages, or no package at all: a usage error (2)
    naming debian-install, and neither dpkg nor apt-get run (stubs that log, here)."""
    command = debian_install_on_a_bare_path(tmp_path)
    log = tmp_path / "calls.log"
    logging_stubs(tmp_path / "bin", log)
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr == f"debian-install: {error}\n"
    assert not log.exists()


def private_usr_sbin() -> bool:
    """Whether this process may give a command a mount namespace of its own, in which a
    directory of the test's stands for /usr/sbin (root, and a kernel and container that
    allow it)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                          capture_output=True, check=False).returncode == 0


def with_usr_sbin(directory: Path) -> list[str]:
    """The start of a command run in a mount namespace of its own where `directory` stands for
    /usr/sbin (policy-rc.d's place, and one where the scripts look for nginx)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{directory}" /usr/sbin && exec "$@"', "sh"]


def apt_get_with_nginx_only(bin_dir: Path, log: Path, then: str) -> None:
    """An apt-get in `bin_dir` that logs its calls to `log` (as logging_stubs') and succeeds
    but has no nginx-light (100, as in newer Debian releases); while it installs nginx, it logs
    what /usr/sbin/policy-rc.d answers about starting it, then runs the shell lines `then`."""
    apt_get = bin_dir / "apt-get"
    apt_get.write_text(
        "#!/bin/sh\n"
        f'echo "apt-get $* ($DEBIAN_FRONTEND)" >>{log}\n'
        'case "$*" in\n'
        "    *nginx-light) exit 100 ;;\n"
        f'    *nginx) /usr/sbin/policy-rc.d nginx start; echo "policy-rc.d: $?" >>{log}\n'
        f"{then};;\n"
        "esac\n")
    apt_get.chmod(0o755)


NGINX = "".join(f"apt-get install -y -qq --no-install-recommends {package} (noninteractive)\n"
                for package in ("nginx-light", "nginx")) + "policy-rc.d: 101\n"


@pytest.mark.skipif(not private_usr_sbin(), reason="needs root and a private mount namespace")
@pytest.mark.parametrize("case", ["none there", "one there", "interrupted"])
def test_debian_install_keeps_nginx_from_starting_a_server(tmp_path: Path, case: str) -> None:
    """Debian's nginx starts a server on port 80 when installed: a /usr/sbin/policy-rc.d that
    exits 101 forbids it for the install, and is removed after it (after a Ctrl-C too), unless
    one was there already, which is kept as it is. nginx-light, gone from newer releases, falls
    back to nginx. Here the command runs in a mount namespace of its own whose /usr/sbin is a
    directory of the test's; apt-get is a stub that logs its calls and, while it installs nginx,
    what policy-rc.d answers; it has no nginx-light (100) and, for the Ctrl-C, waits in the
    nginx install."""
    env = apt_config_with_dpkg_state(tmp_path, "tmp.i")  # no interrupted dpkg to finish
    command = debian_install_on_a_bare_path(tmp_path / "place")
    log = tmp_path / "calls.log"
    logging_stubs(tmp_path / "place" / "bin", log)
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    theirs = "#!/bin/sh\n# the administrator's own\nexit 101\n"
    if case == "one there":
        (sbin / "policy-rc.d").write_text(theirs)
        (sbin / "policy-rc.d").chmod(0o755)
    started = tmp_path / "installing nginx"
    apt_get_with_nginx_only(tmp_path / "place" / "bin", log,
                            waiting_in(started) if case == "interrupted" else "")
    command = [*with_usr_sbin(sbin), *command, "--nginx", "curl"]
    if case == "interrupted":
        result = run_with_ctrl_c(command, started, "apt-get installing nginx", env)
    else:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                                check=False)
    expected = 0 if case != "interrupted" else -signal.SIGINT
    assert (result.returncode, result.stderr) == (expected, ""), result
    assert result.stdout == "debian-install: installing Debian packages: curl nginx-light\n"
    assert log.read_text() == (
        UPDATE + "apt-get install -y -qq --no-install-recommends curl (noninteractive)\n" + NGINX)
    if case == "one there":
        assert [p.name for p in sbin.iterdir()] == ["policy-rc.d"]
        assert (sbin / "policy-rc.d").read_text() == theirs
    else:
        assert list(sbin.iterdir()) == []


@pytest.mark.skipif(not private_usr_sbin(), reason="needs root and a private mount namespace")
@pytest.mark.parametrize("caller", ["setup --tests", "bench"])
def test_setup_and_bench_install_nginx_kept_from_starting_a_server(
        tmp_path: Path, caller: str) -> None:
    """Without nginx (here: a PATH without it and an empty /usr/sbin, in a mount namespace of
    the test's) setup --tests and bench install it as debian-install does, without recommends
    (bench installed its packages with them), and say so in their own names; a failed
    installation (here: apt-get fails at nginx, 100) ends them with apt-get's status, the
    policy-rc.d added for it removed."""
    env = apt_config_with_dpkg_state(tmp_path, "tmp.i")  # no interrupted dpkg to finish
    log = tmp_path / "calls.log"
    if caller == "bench":
        command = bench_on_a_bare_path(tmp_path / "place")
    else:
        command = [*setup_on_a_bare_path(tmp_path / "place"), "--tests"]
        link_tools(tmp_path / "place" / "bin", "chmod", "rm")
    logging_stubs(tmp_path / "place" / "bin", log)
    apt_get_with_nginx_only(tmp_path / "place" / "bin", log, "exit 100")
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    result = subprocess.run([*with_usr_sbin(sbin), *command], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert result.returncode == 100, result
    name = caller.split()[0]
    messages, quiet = ((result.stdout, result.stderr) if name == "setup"
                       else (result.stderr, result.stdout))
    assert quiet == "", result
    assert messages.startswith(f"{name}: installing Debian packages: "), result
    assert messages.endswith(" nginx-light\n"), result
    calls = log.read_text()
    assert calls.startswith(UPDATE) and calls.endswith(NGINX), calls
    assert "--no-install-recommends" in calls.splitlines()[1], calls
    assert list(sbin.iterdir()) == []


PROBE_PROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "setup-probe"
version = "0"

[project.optional-dependencies]
dev = []

[tool.setuptools]
py-modules = []
"""


# setup's packages are all there: it goes straight to .venv (else it would install them first)
setup_installs_nothing = pytest.mark.skipif(
    not all(map(shutil.which, ("ffmpeg", "fusermount3", "mpv"))),
    reason="scripts/setup would install Debian packages first")


@setup_installs_nothing
@pytest.mark.timeout(300)
@pytest.mark.parametrize("breakage", ["python gone", "pip missing"])
def test_setup_repairs_a_venv_its_stamp_calls_installed(tmp_path: Path, breakage: str) -> None:
    """The stamp said "installed", so setup did nothing and exited 0, leaving broken a .venv
    whose python an upgrade removed, or one whose creation was interrupted before pip. Here
    setup runs in a copy with a project of its own, small to install."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "setup", tmp_path / "scripts")
    project = tmp_path / "pyproject.toml"
    project.write_text(PROBE_PROJECT)
    venv = tmp_path / ".venv"
    if breakage == "python gone":
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3")
    else:
        subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    digest = hashlib.sha256(project.read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()

    result = subprocess.run([str(tmp_path / "scripts" / "setup")], capture_output=True,
                            text=True, timeout=280, check=False)
    assert result.returncode == 0, result
    works = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", "setup-probe"],
                           capture_output=True, text=True, check=False)
    assert works.returncode == 0, works
    assert (venv / f".installed-{digest}").is_file()


def venv_made_without_pip(project: Path) -> Path:
    """`project`/.venv made without pip by a python3 other than the one on PATH: the same
    interpreter reached through a directory of its own (as uv's own pythons are), with a
    prompt; marked installed for the current pyproject.toml, as an earlier setup would."""
    real = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    theirs = project / "their-python" / "python3"
    theirs.parent.mkdir()
    theirs.symlink_to(real)
    venv = project / ".venv"
    subprocess.run([str(theirs), "-m", "venv", "--without-pip", "--prompt", "mine", str(venv)],
                   check=True)
    digest = hashlib.sha256((project / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()
    return venv


@setup_installs_nothing
@pytest.mark.timeout(300)
def test_setup_adds_pip_to_a_venv_made_without_it_keeping_its_python(tmp_path: Path) -> None:
    """setup ran `python3 -m venv` over a .venv made without pip (uv venv, venv --without-pip):
    it rewrote pyvenv.cfg for PATH's python3 (home, version, prompt gone) while the venv's links
    still led to the python it was made with. Now that python adds pip (ensurepip) and the
    venv stays as it was made."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "setup", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text(PROBE_PROJECT)
    venv = venv_made_without_pip(tmp_path)
    config = (venv / "pyvenv.cfg").read_text()
    python = (venv / "bin" / "python").resolve()

    result = subprocess.run([str(tmp_path / "scripts" / "setup")], capture_output=True,
                            text=True, timeout=280, check=False)
    assert result.returncode == 0, result
    assert (venv / "pyvenv.cfg").read_text() == config
    assert (venv / "bin" / "python").resolve() == python
    assert result.stdout.startswith("setup: adding pip to .venv (.venv/bin/python -m ensurepip)\n")
    works = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", "setup-probe"],
                           capture_output=True, text=True, check=False)
    assert works.returncode == 0, works


@setup_installs_nothing
@pytest.mark.timeout(300)
def test_setup_redoes_an_install_that_did_not_finish(tmp_path: Path) -> None:
    """The stamp of the project's last install stayed while setup installed again (here: into
    a .venv made without pip), so an install that did not finish (a Ctrl-C; here pip finds no
    setuptools to build with, PIP_NO_INDEX) was taken for done by the next run, which did
    nothing and exited 0."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "setup", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text(PROBE_PROJECT)
    venv = venv_made_without_pip(tmp_path)
    setup = [str(tmp_path / "scripts" / "setup")]

    stopped = subprocess.run(setup, capture_output=True, text=True, timeout=120, check=False,
                             env={**os.environ, "PIP_NO_INDEX": "1"})
    assert stopped.returncode == 1, stopped
    assert "setuptools" in stopped.stderr, stopped.stderr
    result = subprocess.run(setup, capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result
    assert result.stdout == "setup: installing the project into .venv (pip install -e '.[dev]')\n"
    works = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", "setup-probe"],
                           capture_output=True, text=True, check=False)
    assert works.returncode == 0, works


@setup_installs_nothing
def test_setup_leaves_a_venv_without_pip_alone_when_its_python_cannot_add_pip(
        tmp_path: Path) -> None:
    """As Debian's python without python3-venv ("ensurepip is disabled"): here an ensurepip
    on PYTHONPATH that fails. setup said why and what to do, and left .venv as it was (it
    replaced the venv's configuration with python3's, whose isolated ensurepip worked)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "setup", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text(PROBE_PROJECT)
    venv = venv_made_without_pip(tmp_path)
    config = (venv / "pyvenv.cfg").read_text()
    disabled = tmp_path / "disabled" / "ensurepip"
    disabled.mkdir(parents=True)
    (disabled / "__init__.py").touch()
    (disabled / "__main__.py").write_text('raise SystemExit("ensurepip is disabled here")\n')

    result = subprocess.run([str(tmp_path / "scripts" / "setup")], capture_output=True,
                            text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONPATH": str(disabled.parent)})
    assert result.returncode == 1, result
    version = subprocess.run([str(venv / "bin" / "python"), "-V"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert result.stderr == (
        f"ensurepip is disabled here\nsetup: .venv's python ({version}) cannot add pip to it;"
        " install pip into .venv, or remove .venv for setup to make one with python3\n")
    assert (venv / "pyvenv.cfg").read_text() == config
    assert not list(venv.glob("lib/python*/site-packages/pip"))
