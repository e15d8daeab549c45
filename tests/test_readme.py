"""The README's code examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        if "mo.patch(" in block and "from_pretrained" in block:
            continue  # needs a model directory on disk; covered by the patch tests
        exec(compile(block, str(README), "exec"), {})
