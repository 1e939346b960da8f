# Robustness checks (see SECURITY.md).  CI: pip install atheris; apt-get install -y clang valgrind
FUZZ_SECONDS ?= 30

.PHONY: fuzz sanitize leakcheck

fuzz:            ## every fuzz target for FUZZ_SECONDS each; fails on a crash
	bash fuzz/run.sh $(FUZZ_SECONDS)

sanitize:        ## the test suite against an ASan + UBSan build (in a scratch copy)
	bash tools/sanitize.sh

leakcheck:       ## load/run/free cycles: RSS + Python heap growth bounds; valgrind on factrace's .so frames
	python tools/leakcheck.py --valgrind
