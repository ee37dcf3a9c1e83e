"""The Vagrant lab's files (vagrant/): `vagrant validate` on the Vagrantfile and syntax
checks of the provisioning and helper scripts. The lab itself (three VMs, one cold
migration) is scripts/vagrant-smoke, far too slow for the default run."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
SHELL_SCRIPTS = [
    *sorted((VAGRANT_DIR / "provision").glob("*.sh")),
    VAGRANT_DIR / "provision" / "lab-guest",
    VAGRANT_DIR / "prepare-host",
    REPO / "scripts" / "build-vagrant-box",
]
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
# scripts/lab's slots 0..7 use 198.18.K.0/24.
LAB_SLOTS = ipaddress.ip_network("198.18.0.0/21")

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None,
                                   reason="vagrant is not installed; scripts/install installs it")


def vagrant(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`vagrant ARGS` on vagrant/Vagrantfile with a throw-away home and machine state."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("COLDFERRY_LAB_", "VAGRANT_"))}
    full_env.update(VAGRANT_CWD=str(VAGRANT_DIR), VAGRANT_HOME=str(tmp_path / "vagrant.d"),
                    VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"), VAGRANT_CHECKPOINT_DISABLE="1",
                    VAGRANT_NO_COLOR="1", **env)
    return subprocess.run(["vagrant", *args], env=full_env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@needs_vagrant
@pytest.mark.parametrize("domain_type", ["", "kvm", "qemu"])
def test_vagrantfile_validates(tmp_path, domain_type):
    done = vagrant(tmp_path, "validate", COLDFERRY_LAB_DOMAIN_TYPE=domain_type)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


@needs_vagrant
def test_vagrantfile_rejects_an_unknown_domain_type(tmp_path):
    done = vagrant(tmp_path, "validate", COLDFERRY_LAB_DOMAIN_TYPE="xen")
    assert done.returncode != 0
    assert "COLDFERRY_LAB_DOMAIN_TYPE=xen: use kvm or qemu" in done.stdout + done.stderr


@needs_vagrant
def test_vagrantfile_defines_the_three_nodes(tmp_path):
    # `vagrant status` reads the machine list without touching libvirt for machines never created.
    done = vagrant(tmp_path, "status", "--machine-readable", COLDFERRY_LAB_DOMAIN_TYPE="qemu")
    assert done.returncode == 0, done.stdout + done.stderr
    machines = {line.split(",")[1] for line in done.stdout.splitlines()
                if line.count(",") >= 3 and line.split(",")[2] == "provider-name"}
    assert machines == {"controller", "host1", "host2"}


def test_lab_addresses_stay_in_the_benchmark_range_and_off_the_namespace_lab():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    subnet = re.search(r'^SUBNET = "([0-9.]+)"', text, re.M).group(1)
    management = ipaddress.ip_network(re.search(r'^MANAGEMENT = "([0-9./]+)"', text, re.M).group(1))
    private = ipaddress.ip_network(f"{subnet}.0/24")
    for net in (private, management):
        assert net.subnet_of(LAB_NET), net
        assert not net.overlaps(LAB_SLOTS), net
    assert not private.overlaps(management)
    nodes = {name: f"{subnet}.{n}" for name, n in re.findall(r'name: "(\w+)", ip: "#\{SUBNET\}\.(\d+)"', text)}
    assert set(nodes) == {"controller", "host1", "host2"}
    assert all(ipaddress.ip_address(ip) in private for ip in nodes.values())
    # prepare-host writes known_hosts for the host nodes under these addresses.
    prepared = dict(re.findall(r'"(host\d)=([0-9.]+)"', (VAGRANT_DIR / "prepare-host").read_text()))
    assert prepared == {k: v for k, v in nodes.items() if k.startswith("host")}


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_syntax(script):
    assert script.is_file(), f"{script} is missing"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", [p for p in SHELL_SCRIPTS if p.suffix != ".sh" or p.name != "lib.sh"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_shell_scripts_are_executable_and_strict(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in script.read_text()


def test_smoke_script_compiles_and_explains_itself():
    done = subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "scripts/vagrant-smoke"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "vagrant destroy" in done.stdout and "--keep-workdir" in done.stdout


def test_lab_guest_helper_usage():
    done = subprocess.run(["bash", str(VAGRANT_DIR / "provision/lab-guest")], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "coldferry-lab-guest create NAME" in done.stdout
