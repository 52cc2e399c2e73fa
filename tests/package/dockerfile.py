"""The Dockerfile at the repository's root, read with dockerfile-parse: its stages and steps."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    """One ``FROM ... AS name`` and the instructions up to the next FROM."""

    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)

    def values(self, instruction: str) -> list[str]:
        return [value for ins, value in self.steps if ins == instruction]

    def one(self, instruction: str) -> str:
        found = self.values(instruction)
        assert len(found) == 1, f"{self.name}: {len(found)} {instruction} instructions"
        return found[0]

    def run_with(self, text: str) -> str:
        """The one RUN step that contains ``text``."""
        found = [value for value in self.values("RUN") if text in value]
        assert len(found) == 1, f"{self.name}: {len(found)} RUN steps with {text!r}"
        return found[0]


def parser() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def stages() -> list[Stage]:
    out: list[Stage] = []
    for item in parser().structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            base, _, name = value.partition(" AS ")
            out.append(Stage(name=name.strip(), base=base.strip()))
        elif out and instruction != "COMMENT":
            out[-1].steps.append((instruction, value))
    return out


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) argument: CMD, ENTRYPOINT, VOLUME, HEALTHCHECK's CMD."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed)
    return parsed


def healthcheck(value: str) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options (``--interval=30s``...) and its exec-form command."""
    options_text, _, command = value.partition("CMD")
    options = dict(opt.removeprefix("--").split("=", 1) for opt in shlex.split(options_text))
    return options, exec_form(command.strip())
