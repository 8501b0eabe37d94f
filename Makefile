# The two commands a newcomer needs, and a few more for day-to-day work.
.PHONY: demo test bench api up down reset fmt lint sam-build schemas

demo:   ## run the whole flow locally, end to end
	scripts/demo

test:   ## run the whole test suite (brings PostgreSQL and moto up itself)
	scripts/test

api:    ## serve the HTTP API locally (the real function behind a stand-in for API Gateway)
	scripts/api

bench:  ## run the benchmarks against the local environment
	scripts/bench

sam-build: ## build the Lambda functions with SAM (x86_64; ARCH=arm64 with the aarch64 target installed)
	scripts/dev-env up && . .local/env && SAM_CLI_TELEMETRY=0 sam build --parameter-overrides Architecture=$(or $(ARCH),x86_64)

up:     ## start the local environment (PostgreSQL, moto)
	scripts/dev-env up

down:   ## stop it
	scripts/dev-env down

reset:  ## stop it and delete its data
	scripts/dev-env reset

schemas: ## regenerate schemas/ (the event contracts) from the Rust types
	UPDATE_SCHEMAS=1 cargo nextest run -p outbox-tests the_committed_schemas_are_the_types

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings
