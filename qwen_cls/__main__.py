"""``python -m qwen_cls`` (what torchrun launches) runs the same CLI as ``qwen-cls``."""

from qwen_cls.cli import main

main()
