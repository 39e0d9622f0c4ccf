"""The READMEs stay in step: the Chinese README shows the same commands as the English one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(markdown: str) -> list[str]:
    """Every line of every ```bash block, without its trailing comment."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).rstrip()
            if command:
                lines.append(command)
    return lines


def test_the_chinese_readme_shows_the_same_commands():
    english = (ROOT / "README.md").read_text(encoding="utf-8")
    chinese = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert commands(english) and commands(chinese) == commands(english)
    links = sorted(set(re.findall(r"\]\((docs/[\w.-]+)\)", english)))
    assert links and links == sorted(set(re.findall(r"\]\((docs/[\w.-]+)\)", chinese)))
    assert "README.zh-CN.md" in english and "README.md" in chinese
