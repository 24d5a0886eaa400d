"""Packaging hooks that pyproject.toml cannot express: the ``.pth`` file that arms the torchvision guard.

Every interpreter of an environment with compress installed reads ``compress-vision-torchvision-guard.pth``
at start-up and arms ``_compress_guard`` (cheap: no torch import), so ``import timm`` or ``import lightning``
works on a CPU torch even when nothing imports ``compress`` first. Regular wheels get the file through
``build_py``; editable installs (``pip install -e .``) through the editable wheel.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "compress-vision-torchvision-guard.pth"
# A .pth line that starts with "import" is executed; a missing module must not break start-up.
LINE = 'import sys; exec("try:\\n import _compress_guard\\n _compress_guard.install_hook()\\nexcept ImportError:\\n pass")\n'


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        (Path(self.build_lib) / PTH).write_text(LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy and adds the .pth file to the editable wheel."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH, LINE.encode())

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithPth(super()._select_strategy(name, tag, build_lib))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
