"""Scripts and extensions (A1111's Script API): the script base class and per-request binding (`script_base`),
callbacks (`callbacks`), the server's script host that loads `scripts/` and the enabled extensions (`host`),
X/Y/Z plot's axes (`xyz`; the labelled grids are `modules.core.grids`). A1111's module names that extensions import
(`modules.scripts`, `modules.script_callbacks`, `modules.shared`, `modules.processing`, `modules.images`) are thin
views over these."""
