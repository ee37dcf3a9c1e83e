"""qemu-img through a runner: the JSON it prints, the chains it describes, the argument lists."""

from __future__ import annotations

import json
import sys

import pytest

from driver.errors import ImageError
from driver.libvirt import images

# What qemu-img 8.2 prints for a qcow2 overlay (info --output=json --force-share).
OVERLAY_JSON = json.dumps({
    "children": [{"name": "file", "info": {"children": [], "virtual-size": 197120, "filename": "/i/u/disk",
                                           "format": "file", "actual-size": 200704, "format-specific": {
                                               "type": "file", "data": {}}, "dirty-flag": False}}],
    "backing-filename-format": "qcow2", "virtual-size": 10737418240, "filename": "/i/u/disk",
    "cluster-size": 65536, "format": "qcow2", "actual-size": 200704,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
                                                  "lazy-refcounts": False, "refcount-bits": 16,
                                                  "corrupt": False, "extended-l2": False}},
    "full-backing-filename": "/i/_base/cirros.qcow2", "backing-filename": "../_base/cirros.qcow2",
    "dirty-flag": False})


class Runner:
    """Answers ``qemu-img info`` from a dict of path -> JSON object; records every argv."""

    def __init__(self, infos: dict[str, dict] | None = None) -> None:
        self.infos = infos or {}
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[1] == "info":
            return json.dumps(self.infos[argv[-1]])
        return ""


def test_info_parses_qemu_img_json():
    calls = []

    def run(argv):
        calls.append(list(argv))
        return OVERLAY_JSON
    info = images.info("/i/u/disk", run)
    assert info == images.ImageInfo("/i/u/disk", "qcow2", 10737418240, 200704, "/i/_base/cirros.qcow2", "qcow2")
    assert calls == [["qemu-img", "info", "--output=json", "--force-share", "/i/u/disk"]]


def test_info_of_a_raw_file_without_backing():
    info = images.info("/d", lambda argv: json.dumps({"virtual-size": 5, "filename": "/d", "format": "raw"}))
    assert (info.format, info.virtual_size, info.actual_size, info.backing_file, info.backing_format) == (
        "raw", 5, 0, "", "")


def test_info_falls_back_to_the_backing_filename():
    info = images.info("/d", lambda argv: json.dumps({"format": "qcow2", "backing-filename": "/b"}))
    assert info.backing_file == "/b"


def test_chain_top_first():
    runner = Runner({"/top": {"format": "qcow2", "full-backing-filename": "/mid"},
                     "/mid": {"format": "qcow2", "backing-filename": "/base"},
                     "/base": {"format": "raw", "virtual-size": 7}})
    assert [(i.path, i.format) for i in images.chain("/top", runner)] == [
        ("/top", "qcow2"), ("/mid", "qcow2"), ("/base", "raw")]


def test_chain_of_a_standalone_image():
    assert [i.path for i in images.chain("/only", Runner({"/only": {"format": "raw"}}))] == ["/only"]


@pytest.mark.parametrize("infos", [
    {"/a": {"backing-filename": "/b"}, "/b": {"backing-filename": "/a"}},
    {"/a": {"backing-filename": "/a"}},
])
def test_chain_loop_is_an_image_error(infos):
    with pytest.raises(ImageError) as e:
        images.chain("/a", Runner(infos))
    assert "loops" in str(e.value) and "/a" in str(e.value)


def test_chain_too_deep_is_an_image_error():
    infos = {f"/l{i}": {"backing-filename": f"/l{i + 1}"} for i in range(40)}
    runner = Runner(infos)
    with pytest.raises(ImageError):
        images.chain("/l0", runner)
    assert len(runner.calls) <= 34


def test_resize_argv():
    r = Runner()
    images.resize("/i/u/disk", "qcow2", 21474836480, r)
    assert r.calls == [["qemu-img", "resize", "-f", "qcow2", "/i/u/disk", "21474836480"]]


def test_rebase_unsafe_argv():
    r = Runner()
    images.rebase_unsafe("/i/u/disk", "/i/_base/b", "raw", r)
    assert r.calls == [["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", "/i/_base/b", "/i/u/disk"]]


def test_flatten_argv():
    r = Runner()
    images.flatten("/i/u/disk", "/i/u/disk.flat", r)
    assert r.calls == [["qemu-img", "convert", "-O", "qcow2", "/i/u/disk", "/i/u/disk.flat"]]


def test_run_returns_stdout():
    assert images.run([sys.executable, "-c", "print('hello')"]) == "hello\n"


def test_run_failure_is_an_image_error_with_stderr():
    with pytest.raises(ImageError) as e:
        images.run([sys.executable, "-c", "import sys; sys.exit(\"Could not open '/x': No such file\")", "/x"])
    assert str(e.value) == "disk image /x: Could not open '/x': No such file"


def test_run_missing_program_is_an_image_error():
    with pytest.raises(ImageError) as e:
        images.run(["/nonexistent/qemu-img", "info", "/x"])
    assert "/nonexistent/qemu-img" in str(e.value) and str(e.value).startswith("disk image /x:")
