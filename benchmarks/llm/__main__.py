"""``python -m benchmarks.llm [--quick] [--only SECTION ...] [--json PATH]``: the LLM path end to
end, each Tandem figure beside its reference (:mod:`benchmarks.llm.end_to_end`)."""

import sys

from benchmarks.llm.end_to_end import main

sys.exit(main())
