"""Feature validation with Great Expectations 1.x: gate, freshness, drift, skew."""

import os

# Great Expectations would otherwise try to send usage statistics (no network here).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
