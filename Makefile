# Shorthands for scripts/dev.sh (which works without make too).
.PHONY: run test setup
run:
	bash scripts/dev.sh run
test:
	bash scripts/dev.sh test
setup:
	bash scripts/dev.sh setup
