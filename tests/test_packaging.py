"""The wheel users install, and the one the GPU image installs: what its metadata says and what it carries."""

from __future__ import annotations

import shutil
import zipfile
from email.parser import Parser
from pathlib import Path

from conftest import REPO, build_wheel, dockerfile_copies


def _assert_licensed(wheel_path: Path) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        dist_info = next(n.rsplit("/", 1)[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        assert meta["License-Expression"] == "Apache-2.0"
        assert meta["License"] is None  # the free-text field the table form wrote, deprecated by setuptools
        assert meta.get_all("License-File") == ["LICENSE"]
        assert wheel.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()


def test_the_wheel_declares_its_license_as_an_spdx_expression_and_carries_the_text(tmp_path):
    _assert_licensed(build_wheel(tmp_path))


def test_the_wheel_carries_the_embedded_default(tmp_path):
    """What the command lines run without --config: the demo's config, the same bytes as configs/tiny.yaml."""
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        assert wheel.read("bpo_ray/config/tiny.yaml") == (REPO / "configs" / "tiny.yaml").read_bytes()


def test_the_gpu_images_dependency_layer_holds_every_file_the_package_metadata_names(tmp_path):
    """cluster/Dockerfile installs the dependencies from the metadata alone, before the source is copied: the
    files it copies for that layer (laid out here as it lays them out in /app) must build the same licensed
    wheel. A file pyproject names but the layer lacks is a warning today and a failed image build once
    setuptools enforces it."""
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    layer = dockerfile[:dockerfile.index('"/app[vllm]"')]
    for sources, dest in dockerfile_copies(layer):
        for source in sources:
            target = tmp_path / dest.lstrip("/")
            target = target / source if dest.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, target)
    # The layer's RUN makes an empty package so that the install resolves the dependencies alone.
    assert "touch /app/bpo_ray/__init__.py" in layer
    (tmp_path / "app" / "bpo_ray").mkdir()
    (tmp_path / "app" / "bpo_ray" / "__init__.py").touch()
    _assert_licensed(build_wheel(tmp_path, src=tmp_path / "app"))
