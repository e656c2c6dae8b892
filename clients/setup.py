"""Builds vlm-client. The gRPC stubs are generated here, in every build, from the one contract
(protos/vlm/v1/*.proto, beside clients/ in the repository; inside the sdist, copied in by `sdist`), so a
wheel can never carry stubs older than its contract. Editable installs generate them into the source tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def proto_root() -> Path:
    for candidate in (HERE / "protos", HERE.parent / "protos"):
        if (candidate / "vlm" / "v1").is_dir():
            return candidate
    raise SystemExit("vlm-client: protos/vlm/v1 not found (neither in the sdist nor beside clients/)")


def generate_stubs(out: Path) -> None:
    """vlm/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under ``out``."""
    from importlib.resources import files

    from grpc_tools import protoc

    root = proto_root()
    protos = sorted(str(path) for path in (root / "vlm" / "v1").glob("*.proto"))
    well_known = str(files("grpc_tools") / "_proto")
    (out / "vlm" / "v1").mkdir(parents=True, exist_ok=True)
    args = [f"-I{root}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(["grpc_tools.protoc", *args, *protos]) != 0:
        raise SystemExit("vlm-client: grpc_tools.protoc failed on " + ", ".join(protos))


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(HERE if self.editable_mode else Path(self.build_lib))


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        shutil.copytree(proto_root(), Path(base_dir) / "protos", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
