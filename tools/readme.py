"""README.md from nbs/index.ipynb (`make readme`): the landing page and the repository's front page are one text.

- markdown cells go in verbatim, with links relative to `nbs/` made relative to the repository root;
- a code cell's source goes in as a ```python block unless the cell is `#| hide`, `#| include: false` or
  `#| echo: false`;
- its outputs go in unless the cell is `#| hide`, `#| include: false` or `#| output: false`: markdown as it is (display
  maths as `$$` blocks, where the docs site shows the same output's SVG), images as PNG files under `nbs/images/`
  (named by the cell's `#| label:`, captioned by its `#| fig-cap:`), other text and printed output in a plain block
  (warnings on stderr left out);
- raw cells (front matter for the docs site) are left out.

The PNG files are the notebook's stored outputs, byte for byte, so the figure the README shows is the one the docs show.
`tests/test_readme.py` regenerates both into a temporary folder and compares them with the committed files.
"""
import argparse, base64, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path("nbs/index.ipynb")
IMAGES = Path("nbs/images")
HEADER = "<!-- Generated from nbs/index.ipynb by `make readme` (tools/readme.py): edit the notebook, not this file. -->"
DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
LINK = re.compile(r"(\]\()(?!https?:|mailto:|#|/)([^)\s]+)(\))")  # relative markdown links and images


def directives(source: str) -> dict:
    "A cell's `#| key: value` lines as {key: value} (a bare `#| hide` becomes {'hide': 'true'})."
    return {m.group(1): m.group(2).strip("'\"") or "true" for line in source.splitlines()
            if (m := DIRECTIVE.match(line))}


def code_of(source: str) -> str:
    "A code cell's source without its directive lines."
    return "\n".join(line for line in source.splitlines() if not DIRECTIVE.match(line)).strip("\n")


def from_root(markdown: str, folder: Path = NOTEBOOK.parent) -> str:
    "Markdown whose relative links point from `folder` made to point from the repository root."
    return LINK.sub(lambda m: f"{m.group(1)}{(folder / m.group(2)).as_posix()}{m.group(3)}", markdown)


def false(d: dict, key: str) -> bool: return d.get(key, "").lower() == "false"


def render(notebook: Path) -> tuple[str, dict[Path, bytes]]:
    "(README text, {path of each image from the repository root: its bytes}) of a notebook."
    nb = json.loads(notebook.read_text())
    parts, images = [HEADER], {}
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown": parts.append(from_root(source.strip("\n")))
        if cell["cell_type"] != "code": continue
        d = directives(source)
        if "hide" in d or false(d, "include"): continue
        if not false(d, "echo") and code_of(source): parts.append(f"```python\n{code_of(source)}\n```")
        if false(d, "output"): continue
        for n, out in enumerate(cell.get("outputs", [])):
            data = out.get("data", {})
            if "text/markdown" in data: parts.append("".join(data["text/markdown"]).strip("\n"))
            elif "image/png" in data:
                name = d.get("label", f"index-{i}-{n}").removeprefix("fig-")
                path = IMAGES / f"{name}.png"
                images[path] = base64.b64decode("".join(data["image/png"]))
                parts.append(f"![{d.get('fig-cap', name)}]({path.as_posix()})")
            elif "text/plain" in data: parts.append(f"```\n{''.join(data['text/plain']).rstrip()}\n```")
            elif out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(f"```\n{''.join(out['text']).rstrip()}\n```")
    return "\n\n".join(parts) + "\n", images


def write(root: Path = ROOT, notebook: Path = ROOT / NOTEBOOK):
    "Write README.md and its images under `root`."
    text, images = render(notebook)
    for path, data in images.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "README.md").write_text(text)
    return root / "README.md", [root / p for p in images]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="folder to write README.md and nbs/images/ into")
    args = parser.parse_args()
    readme, images = write(args.root)
    print(f"wrote {readme}" + "".join(f", {p}" for p in images))
