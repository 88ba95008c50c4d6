"""The wheel users install: what its metadata says and what it carries."""

from __future__ import annotations

import zipfile
from email.parser import Parser

from conftest import REPO, build_wheel


def test_the_wheel_declares_its_license_as_an_spdx_expression_and_carries_the_text(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        dist_info = next(n.rsplit("/", 1)[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        assert meta["License-Expression"] == "Apache-2.0"
        assert meta["License"] is None  # the free-text field the table form wrote, deprecated by setuptools
        assert meta.get_all("License-File") == ["LICENSE"]
        assert wheel.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
