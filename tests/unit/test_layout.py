"""The house: imports between certrelay's modules only point down (no circle), so that
each module can be read, tested and replaced with what it imports alone."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "certrelay")


def imports():
    """Return {module: the certrelay modules it imports, at the top or inside a function}."""
    modules = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py")}
    graph = {}
    for module in modules:
        with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as file:
            tree = ast.parse(file.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "certrelay":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("certrelay."):
                found.add(node.module.split(".")[1])
        graph[module] = found & modules
    return graph


def circle_from(graph, start):
    """Return a list of modules leading from `start` back to it, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for imported in sorted(graph[module]):
            if imported == start:
                return path + [start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, path + [imported]))
    return None


def test_no_module_imports_itself_through_others():
    graph = imports()

    assert graph["batch"] and graph["cli"]  # the scan sees imports, local ones too
    circles = [circle for circle in (circle_from(graph, module) for module in sorted(graph)) if circle]
    assert circles == [], "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)
