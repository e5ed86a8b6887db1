"""Errors raised by torch-rewrite, each naming what is at fault and what is supported."""


class RewriteError(Exception):
    """Base class of every error torch-rewrite raises on purpose."""


class PlanError(RewriteError, ValueError):
    """A plan field is unknown, malformed or matches nothing."""

    def __init__(self, field: str, message: str, allowed: list[str] | None = None):
        self.field = field
        self.allowed = allowed
        text = f"plan field {field!r}: {message}"
        if allowed:
            text += f" (allowed: {', '.join(allowed)})"
        super().__init__(text)


class CaptureError(RewriteError):
    """The model could not be captured as a graph; says why and what to do."""


class PassError(RewriteError):
    """A pass met a graph it cannot rewrite correctly; names the node and module at fault."""

    def __init__(self, pass_name: str, message: str, node: str | None = None, module_path: str | None = None):
        self.pass_name = pass_name
        self.node = node
        self.module_path = module_path
        where = ""
        if node is not None:
            where = f" at node {node!r}"
            if module_path:
                where += f" (module {module_path!r})"
        super().__init__(f"pass {pass_name!r}{where}: {message}")


class VerificationError(RewriteError):
    """The optimized module's outputs differ from the original's beyond tolerance."""
