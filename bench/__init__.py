"""watcher's benchmarks (`make bench`): each figure is reported with a baseline measured in the
same run. See docs/performance.md."""
