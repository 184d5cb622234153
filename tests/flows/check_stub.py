"""Check that the type stubs in flows/runnel/*.pyi match the real `runnel` package.

Run it with `runnel check tests/flows/check_stub.py`: inside runnel's embedded
interpreter `import runnel` is the real package compiled into the binary.
For `runnel` and each submodule (op, win, sources, sinks) it checks that

- the public names (`__all__`, else the names not starting with `_`) are the
  stub's public top-level names (and the stub's `__all__` matches),
- every public function and class has the same parameters as in the stub:
  names, kinds, order and whether they have a default (a class is compared
  by its constructor; public methods too),
- every public function and class has a docstring with an example (a line
  starting with "```python" or ">>>"), and the stub carries the same
  docstring (module docstrings too), so IDEs show the real documentation.

Any difference raises an AssertionError listing all of them, so `runnel
check` exits non-zero. The stubs are read from `../../flows/runnel/`
relative to this file, or from the folder `$RUNNEL_STUB_DIR`.
"""

import ast
import importlib
import inspect
import os
import types

from runnel import Dataflow, op, sinks, sources

MODULES = ["runnel", "runnel.op", "runnel.win", "runnel.sources", "runnel.sinks"]

P = inspect.Parameter


def stub_dir():
    override = os.environ.get("RUNNEL_STUB_DIR")
    if override:
        return os.path.abspath(override)
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "flows", "runnel"))


def stub_path(folder, modname):
    parts = modname.split(".")
    name = "__init__.pyi" if len(parts) == 1 else parts[-1] + ".pyi"
    return os.path.join(folder, name)


def real_module(modname):
    return importlib.import_module(modname)


def is_public(name):
    return not name.startswith("_")


# -- reading the stubs -------------------------------------------------------


def top_level(body):
    """Yield the statements of a stub body, looking inside `if` blocks
    (e.g. `if sys.version_info >= ...:`)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from top_level(node.body)
            yield from top_level(node.orelse)
        else:
            yield node


def stub_names(tree):
    """Map each name a stub defines at top level to its nodes, and return its
    `__all__` (None if it has none).

    Follows stub conventions: an imported name is part of the module only
    when re-exported explicitly (`import x as x`, `from m import x as x`)."""
    names = {}
    all_ = None
    for node in top_level(tree.body):
        found = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found.append(target.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.append(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.asname is not None and alias.asname == alias.name.split(".")[-1]:
                    found.append(alias.asname)
        elif type(node).__name__ == "TypeAlias":  # `type X = ...` (3.12+)
            found.append(node.name.id)
        for name in found:
            if name == "__all__":
                value = node.value
                if isinstance(value, (ast.List, ast.Tuple)):
                    all_ = [e.value for e in value.elts if isinstance(e, ast.Constant)]
            else:
                names.setdefault(name, []).append(node)
    return names, all_


def decorators(node):
    out = set()
    for d in getattr(node, "decorator_list", []):
        if isinstance(d, ast.Name):
            out.add(d.id)
        elif isinstance(d, ast.Attribute):
            out.add(d.attr)
    return out


def ast_params(args):
    """Parameters of an `ast.arguments` as (name, kind, has_default)."""
    positional = [(a, P.POSITIONAL_ONLY) for a in args.posonlyargs]
    positional += [(a, P.POSITIONAL_OR_KEYWORD) for a in args.args]
    first_default = len(positional) - len(args.defaults)
    out = [(a.arg, kind, i >= first_default) for i, (a, kind) in enumerate(positional)]
    if args.vararg is not None:
        out.append((args.vararg.arg, P.VAR_POSITIONAL, False))
    for a, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, P.KEYWORD_ONLY, default is not None))
    if args.kwarg is not None:
        out.append((args.kwarg.arg, P.VAR_KEYWORD, False))
    return out


def base_name(expr):
    if isinstance(expr, ast.Subscript):
        expr = expr.value
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return None


def stub_class_params(cls, classes):
    """Constructor parameters of a stub class (without `self`), or None if it
    cannot tell."""
    inits = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    if inits:
        return [ast_params(f.args)[1:] for f in inits]
    bases = [base_name(b) for b in cls.bases]
    if "NamedTuple" in bases:
        return [[
            (n.target.id, P.POSITIONAL_OR_KEYWORD, n.value is not None)
            for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        ]]
    for base in bases:
        if base in classes:
            return stub_class_params(classes[base], classes)
    return [[]]  # object(): no parameters


# -- reading the real module -------------------------------------------------


def real_params(sig):
    return [(p.name, p.kind, p.default is not P.empty) for p in sig.parameters.values()]


def show(params):
    """Render parameters like a Python signature; `=…` marks a default."""
    parts = []
    saw_posonly = saw_star = False
    for name, kind, has_default in params:
        if kind is not P.POSITIONAL_ONLY and saw_posonly:
            parts.append("/")
            saw_posonly = False
        if kind is P.POSITIONAL_ONLY:
            saw_posonly = True
        if kind is P.KEYWORD_ONLY and not saw_star:
            parts.append("*")
        if kind is P.VAR_POSITIONAL:
            saw_star = True
            name = "*" + name
        elif kind is P.VAR_KEYWORD:
            name = "**" + name
        parts.append(name + ("=…" if has_default else ""))
    if saw_posonly:
        parts.append("/")
    return "(" + ", ".join(parts) + ")"


def explain(real, stub):
    real_names = [p[0] for p in real]
    stub_names_ = [p[0] for p in stub]
    notes = []
    missing = [n for n in real_names if n not in stub_names_]
    extra = [n for n in stub_names_ if n not in real_names]
    if missing:
        notes.append("missing in stub: " + ", ".join(missing))
    if extra:
        notes.append("not in real module: " + ", ".join(extra))
    if not notes and real_names != stub_names_:
        notes.append("different order")
    if not notes:
        for (name, real_kind, real_default), (_, stub_kind, stub_default) in zip(real, stub):
            if real_kind != stub_kind:
                notes.append(f"{name} is {real_kind.description} in real, {stub_kind.description} in stub")
            if real_default != stub_default:
                where = "real" if real_default else "stub"
                notes.append(f"{name} has a default only in {where}")
    return (
        f"{'; '.join(notes)}\n"
        f"        real: {show(real)}\n"
        f"        stub: {show(stub)}"
    )


def has_example(doc):
    return any(
        line.strip().startswith(("```python", ">>>")) for line in (doc or "").splitlines()
    )


def docstring_diff(real_doc, stub_node):
    """None if the stub's docstring equals the real one, else a description."""
    real = inspect.cleandoc(real_doc) if real_doc else None
    stub = ast.get_docstring(stub_node) if stub_node is not None else None
    if real == stub:
        return None
    if stub is None:
        return "stub has no docstring (copy the real one)"
    if real is None:
        return "stub has a docstring but the real object has none"
    real_lines, stub_lines = real.splitlines(), stub.splitlines()
    for i, (a, b) in enumerate(zip(real_lines, stub_lines)):
        if a != b:
            return f"stub docstring differs at line {i + 1}:\n        real: {a!r}\n        stub: {b!r}"
    return (
        f"stub docstring has {len(stub_lines)} lines, the real one {len(real_lines)}"
    )


# -- comparing ---------------------------------------------------------------


def check_signature(errors, qual, real_obj, stub_candidates):
    """Compare real_obj's signature with a list of stub parameter lists (more
    than one for @overload: one must match)."""
    try:
        real = real_params(inspect.signature(real_obj))
    except (TypeError, ValueError) as e:
        errors.append(f"{qual}: cannot read the real signature ({e})")
        return
    if not stub_candidates:
        return
    if any(real == stub for stub in stub_candidates):
        return
    if len(stub_candidates) == 1:
        errors.append(f"{qual}: parameters differ: {explain(real, stub_candidates[0])}")
    else:
        shown = "\n".join(f"        stub: {show(s)}" for s in stub_candidates)
        errors.append(
            f"{qual}: no @overload of the stub matches\n        real: {show(real)}\n{shown}"
        )


def stub_function_params(nodes):
    defs = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    overloads = [d for d in defs if "overload" in decorators(d)]
    chosen = overloads or defs[-1:]
    return [ast_params(d.args) for d in chosen]


def check_methods(errors, qual, cls, stub_cls):
    """Public methods defined in the real class body vs the stub class's."""
    real = {}
    for name, value in vars(cls).items():
        if not is_public(name) or isinstance(value, property):
            continue
        func = getattr(value, "__func__", value)  # staticmethod / classmethod
        if inspect.isfunction(func):
            real[name] = func
    stub = {}
    for node in stub_cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_public(node.name):
            if "property" in decorators(node) or any(d.endswith("setter") for d in decorators(node)):
                continue
            stub.setdefault(node.name, []).append(node)
    for name in sorted(set(real) - set(stub)):
        errors.append(f"{qual}.{name}: public method missing from the stub")
    for name in sorted(set(stub) - set(real)):
        if not hasattr(cls, name):
            errors.append(f"{qual}.{name}: in the stub but not in the real class")
    for name in sorted(set(real) & set(stub)):
        check_signature(errors, f"{qual}.{name}", real[name], stub_function_params(stub[name]))


def check_module(errors, folder, modname):
    mod = real_module(modname)
    path = stub_path(folder, modname)
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except OSError as e:
        errors.append(f"{modname}: cannot read its stub {path} ({e.strerror})")
        return
    except SyntaxError as e:
        errors.append(f"{modname}: stub {path} is not valid Python: {e}")
        return

    diff = docstring_diff(mod.__doc__, tree)
    if diff:
        errors.append(f"{modname} (module docstring): {diff}")

    stub, stub_all = stub_names(tree)
    real_all = getattr(mod, "__all__", None)
    if real_all is not None:
        real_public = set(real_all)
    else:
        real_public = {n for n in vars(mod) if is_public(n)}
    stub_public = {n for n in stub if is_public(n)}

    for name in sorted(real_public - stub_public):
        errors.append(f"{modname}.{name}: public in the real module but missing from the stub")
    for name in sorted(stub_public - real_public):
        errors.append(f"{modname}.{name}: in the stub but not public in the real module")
    if (real_all is not None or stub_all is not None) and set(real_all or ()) != set(stub_all or ()):
        errors.append(
            f"{modname}.__all__ differs: real {sorted(real_all or [])}, stub {sorted(stub_all or [])}"
        )

    classes = {n: nodes[-1] for n, nodes in stub.items() if isinstance(nodes[-1], ast.ClassDef)}
    for name in sorted(real_public):
        qual = f"{modname}.{name}"
        if not hasattr(mod, name):
            try:  # a submodule that nothing has imported yet
                importlib.import_module(qual)
            except ImportError:
                errors.append(f"{qual}: listed in __all__ but not defined")
            continue
        obj = getattr(mod, name)
        if isinstance(obj, types.ModuleType):
            continue
        is_class, is_func = inspect.isclass(obj), callable(obj) and not inspect.isclass(obj)
        if not (is_class or is_func):
            continue
        if not has_example(obj.__doc__):
            what = "docstring" if obj.__doc__ else "docstring (it has none)"
            errors.append(
                f"{qual}: its {what} has no example (a line starting with ```python or >>>)"
            )
        nodes = stub.get(name)
        if not nodes:
            continue  # already reported as missing
        node = nodes[-1]
        if is_class and not isinstance(node, ast.ClassDef):
            errors.append(f"{qual}: a class in the real module but not a class in the stub")
            continue
        if is_func and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            errors.append(f"{qual}: a function in the real module but not a def in the stub")
            continue
        if is_class:
            check_signature(errors, qual, obj, stub_class_params(node, classes))
            check_methods(errors, qual, obj, node)
        else:
            check_signature(errors, qual, obj, stub_function_params(nodes))
        stub_doc_node = node
        if is_func:
            impl = [n for n in nodes if "overload" not in decorators(n)]
            stub_doc_node = impl[-1] if impl else nodes[0]
        diff = docstring_diff(obj.__doc__, stub_doc_node)
        if diff:
            errors.append(f"{qual}: {diff}")


def check_stubs():
    folder = stub_dir()
    errors = []
    if not os.path.isdir(folder):
        errors.append(f"stub folder {folder} does not exist")
    else:
        for modname in MODULES:
            check_module(errors, folder, modname)
    if errors:
        raise AssertionError(
            f"the stubs in {folder} do not match the real runnel package "
            f"({len(errors)} difference{'s' if len(errors) != 1 else ''}):\n"
            + "\n".join(f"  - {e}" for e in errors)
        )


check_stubs()

# A trivial flow, so that this is a valid flow file for `runnel check`.
flow = Dataflow("check_stub")
op.output("out", op.input("in", flow, sources.file("unused.jsonl")), sinks.stdout())
