# The two commands a newcomer needs, and a few more for day-to-day work.
.PHONY: demo test bench up down reset fmt lint

demo:   ## run the whole flow locally, end to end
	scripts/demo

test:   ## run the whole test suite (brings PostgreSQL and moto up itself)
	scripts/test

bench:  ## run the benchmarks against the local environment
	scripts/bench

up:     ## start the local environment (PostgreSQL, moto)
	scripts/dev-env up

down:   ## stop it
	scripts/dev-env down

reset:  ## stop it and delete its data
	scripts/dev-env reset

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings
