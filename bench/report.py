"""Benchmark output that is printed as it comes and can be saved as markdown at the end."""

from __future__ import annotations


class Report:
    def __init__(self):
        self.lines: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, path: str | None) -> None:
        if path:
            with open(path, "w") as out:
                out.write("\n".join(self.lines) + "\n")
