"""The studies behind docs/RESULTS.md, one module each: what it runs (its jobs and their
commands) and the section of the doc it writes."""
