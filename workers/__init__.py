"""Everything that runs jobs: settings, the Procrastinate App, tasks and processes."""
