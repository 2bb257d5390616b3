"""The book: its parameters (the schema every params file is checked against), the steps the
notebooks call, and the runner that executes them with papermill. Imports ``records`` and ``train``."""
