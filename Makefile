# certrelay: make [all] | install | uninstall | install-hook | test | deb | package | demo | e2e | bench | clean
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
PKGLIBDIR ?= $(PREFIX)/lib/certrelay
SHAREDIR ?= $(PREFIX)/share/certrelay
DOCDIR ?= $(PREFIX)/share/doc/certrelay
UNITDIR ?= $(PREFIX)/lib/systemd/system
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
SYSCONFDIR ?= /etc
CONFIG_DIR ?= /etc/letsencrypt
STATE_DIR ?= /var/lib/certrelay
RULES ?= $(SYSCONFDIR)/certrelay/rules.toml
DOCKER ?= /usr/bin/docker
# The server's own python3: with Debian's python3-click, -pyinotify, -sdnotify, no pip.
PYTHON ?= /usr/bin/python3
# The newest Python found, for the second test run with the newest releases from PyPI;
# on a plain Debian 12 that is its own python3 (3.11), still with PyPI's newest releases.
NEWEST_CANDIDATES = $(foreach version,3.14 3.13 3.12,$(wildcard /usr/bin/python$(version) \
	/usr/local/bin/python$(version) $(HOME)/.pyenv/versions/$(version)*/bin/python$(version)))
PYTHON_NEWEST ?= $(or $(firstword $(NEWEST_CANDIDATES)),$(PYTHON))
VENV_NEWEST = .cache/venv-newest
# -rs: every skipped test says why.
PYTEST_FLAGS ?= -q -rs
# As root, `make test` has installed every component first (test-deps): there a test
# that would skip for want of one fails instead (tests/conftest.py).
STRICT = $(if $(filter 0,$(shell id -u)),CERTRELAY_NO_SKIP=1)
# What `make test` needs on Debian 12; tools/need installs the missing ones as root.
TEST_PACKAGES = make python3 python3-venv python3-pip python3-click python3-pyinotify \
	python3-sdnotify python3-pytest python3-hypothesis python3-cryptography \
	busybox-static dash posh mksh yash shellcheck strace inotify-tools \
	pebble openssl ca-certificates util-linux mount postfix dovecot-imapd dovecot-pop3d dovecot-managesieved prosody \
	systemd systemd-container mmdebstrap docker.io iproute2 \
	build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	lintian man-db apprise etcd-server etcd-client python3-nacl

UNITS = certrelay.path certrelay.service certrelay-retry.timer certrelay-watch.service certrelay-subscribe.service \
        certbot-docker-renew.service certbot-docker-renew.timer
PATHS = $(BINDIR) $(PKGLIBDIR) $(DOCDIR) $(CONFIG_DIR) $(STATE_DIR) $(RULES) $(PYTHON) $(DOCKER)
BUILT = $(addprefix build/units/,$(UNITS)) build/bin/certrelay build/man/certrelay.8 \
	build/completion/certrelay build/completion/_certrelay
SUBSTITUTE = sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@PKGLIBDIR@|$(PKGLIBDIR)|g' \
	-e 's|@DOCDIR@|$(DOCDIR)|g' -e 's|@CONFIG_DIR@|$(CONFIG_DIR)|g' \
	-e 's|@STATE_DIR@|$(STATE_DIR)|g' -e 's|@RULES@|$(RULES)|g' -e 's|@PYTHON@|$(PYTHON)|g' \
	-e 's|@DOCKER@|$(DOCKER)|g'
SHELL_SCRIPTS = certrelay/certrelay-hook certrelay/certrelay-post-hook tests/fake_systemctl tests/acme_hooks/auth-hook \
	tests/acme_hooks/cleanup-hook demo/demo.sh demo/systemctl demo/shell-probe-hook \
	debian/certrelay.postinst debian/certrelay.postrm debian/tests/smoke tools/need tools/fresh-check \
	tests/e2e/files/docker-acme-auth tests/e2e/files/docker-acme-cleanup tests/e2e/files/docker-probe-hook

.PHONY: all install uninstall install-hook test test-deps lint test-system test-newest e2e demo bench clean \
	deb lintian package fresh-check mutants

all: $(BUILT)

# Paths are baked in at build time: rebuild when they change.
build/paths: FORCE
	@mkdir -p build
	@echo '$(PATHS)' | cmp -s - $@ || echo '$(PATHS)' > $@
FORCE:

build/units/%: units/%.in units/hardening.in build/paths
	@mkdir -p build/units
	sed -e '/@HARDENING@/{r units/hardening.in' -e 'd}' $< | $(SUBSTITUTE) > $@

build/bin/certrelay: bin/certrelay.in build/paths
	@mkdir -p build/bin
	$(SUBSTITUTE) $< > $@
	chmod 0755 $@

# certrelay(8) from the click definitions; certrelay-rules(5) is man/certrelay-rules.5.
build/man/certrelay.8: tools/manpage.py $(wildcard certrelay/*.py)
	@mkdir -p build/man
	$(PYTHON) tools/manpage.py > $@.tmp && mv $@.tmp $@

# Shell completion from click: the scripts ask certrelay itself at Tab time.
COMPLETE = $(PYTHON) -c 'import sys; sys.path.insert(0, "$(CURDIR)"); \
	from certrelay.cli import main; main(prog_name="certrelay")' > $@.tmp && mv $@.tmp $@
build/completion/certrelay: $(wildcard certrelay/*.py)
	@mkdir -p build/completion
	_CERTRELAY_COMPLETE=bash_source $(COMPLETE)
build/completion/_certrelay: $(wildcard certrelay/*.py)
	@mkdir -p build/completion
	_CERTRELAY_COMPLETE=zsh_source $(COMPLETE)

install: all
	install -d $(DESTDIR)$(PKGLIBDIR)/certrelay/fleet
	install -m 0644 certrelay/*.py $(DESTDIR)$(PKGLIBDIR)/certrelay/
	install -m 0644 certrelay/fleet/*.py $(DESTDIR)$(PKGLIBDIR)/certrelay/fleet/
	install -m 0755 certrelay/certrelay-hook $(DESTDIR)$(PKGLIBDIR)/certrelay/
	install -m 0755 certrelay/certrelay-post-hook $(DESTDIR)$(PKGLIBDIR)/certrelay/
	# Byte-compile now: under ProtectSystem=strict the service could not cache it.
	$(PYTHON) -m compileall -q -d $(PKGLIBDIR)/certrelay $(DESTDIR)$(PKGLIBDIR)/certrelay
	install -D -m 0755 build/bin/certrelay $(DESTDIR)$(BINDIR)/certrelay
	# The hook lives in the package (hook.py finds it there); SHAREDIR keeps a link to it.
	install -d $(DESTDIR)$(SHAREDIR)
	ln -sf $(PKGLIBDIR)/certrelay/certrelay-hook $(DESTDIR)$(SHAREDIR)/certrelay-hook
	ln -sf $(PKGLIBDIR)/certrelay/certrelay-post-hook $(DESTDIR)$(SHAREDIR)/certrelay-post-hook
	install -D -m 0644 etc/rules.toml $(DESTDIR)$(SHAREDIR)/rules.toml.example
	install -D -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/
	install -D -m 0644 build/man/certrelay.8 $(DESTDIR)$(MANDIR)/man8/certrelay.8
	install -D -m 0644 man/certrelay-rules.5 $(DESTDIR)$(MANDIR)/man5/certrelay-rules.5
	install -D -m 0644 build/completion/certrelay $(DESTDIR)$(BASHCOMPDIR)/certrelay
	install -D -m 0644 build/completion/_certrelay $(DESTDIR)$(ZSHCOMPDIR)/_certrelay
	install -d $(DESTDIR)$(UNITDIR)
	install -m 0644 $(addprefix build/units/,$(UNITS)) $(DESTDIR)$(UNITDIR)/
	# Never overwrite an admin's rules.
	[ -e $(DESTDIR)$(RULES) ] || install -D -m 0644 etc/rules.toml $(DESTDIR)$(RULES)

uninstall:
	rm -rf $(DESTDIR)$(PKGLIBDIR) $(DESTDIR)$(SHAREDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(BINDIR)/certrelay $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	rm -f $(DESTDIR)$(MANDIR)/man8/certrelay.8 $(DESTDIR)$(MANDIR)/man5/certrelay-rules.5 \
		$(DESTDIR)$(BASHCOMPDIR)/certrelay $(DESTDIR)$(ZSHCOMPDIR)/_certrelay
	@echo "kept $(DESTDIR)$(RULES), $(STATE_DIR) and $(CONFIG_DIR)/certrelay: remove them by hand if you want"

# Put the hooks where certbot runs deploy and post hooks (the certbot container sees them there).
install-hook:
	install -D -m 0755 certrelay/certrelay-hook $(DESTDIR)$(CONFIG_DIR)/renewal-hooks/deploy/certrelay-hook
	install -D -m 0755 certrelay/certrelay-post-hook $(DESTDIR)$(CONFIG_DIR)/renewal-hooks/post/certrelay-post-hook

# test-system and test-newest side by side (each waits mostly on the processes it
# starts: free ports, temporary dirs), their output kept apart: CI's 30 minutes.
test: test-deps lint
	$(MAKE) --no-print-directory -j2 --output-sync=target test-system test-newest
	$(MAKE) --no-print-directory package
	$(MAKE) --no-print-directory e2e

test-deps:
	@sh tools/need test $(TEST_PACKAGES)

# systemd-analyze verify wants every Exec path to exist: install into build/verify and
# point the units there (docker: the client on PATH, else a stand-in binary).
lint: all
	shellcheck -s sh $(SHELL_SCRIPTS)
	rm -rf build/verify
	$(MAKE) --no-print-directory -B install DESTDIR= PREFIX=$(CURDIR)/build/verify \
		RULES=$(CURDIR)/build/verify/rules.toml DOCKER=$$(command -v docker || echo /bin/true) >/dev/null
	@# verify exits 0 even for unknown keys: any message fails the check.
	out=$$(systemd-analyze verify $(addprefix build/verify/lib/systemd/system/,$(UNITS)) 2>&1); \
		printf '%s\n' "$$out"; test -z "$$out"
	rm -rf build/verify && $(MAKE) --no-print-directory -B all >/dev/null

test-system:
	$(STRICT) $(PYTHON) -m pytest $(PYTEST_FLAGS) -m "not e2e" tests

# The venv is made again when PYTHON_NEWEST changes, and brought to the newest
# releases on every run (that is its point).
NEWEST_REQUIREMENTS = click pyinotify sdnotify 'pyasyncore; python_version >= "3.12"' cryptography \
	pytest hypothesis apprise pynacl
test-newest:
	@if [ "$$(cat $(VENV_NEWEST)/made-with 2>/dev/null)" != "$(PYTHON_NEWEST)" ]; then \
		rm -rf $(VENV_NEWEST) && $(PYTHON_NEWEST) -m venv $(VENV_NEWEST) && \
		echo "$(PYTHON_NEWEST)" > $(VENV_NEWEST)/made-with; fi
	$(VENV_NEWEST)/bin/pip install -q --upgrade $(NEWEST_REQUIREMENTS)
	@$(VENV_NEWEST)/bin/python -c 'import importlib.metadata as m, platform, sys; \
		print("test-newest: Python", platform.python_version(), "(" + sys.argv[1] + ") with", \
		", ".join(n + " " + m.version(n) for n in ("click", "cryptography", "pyinotify", "sdnotify", "apprise", \
		"pynacl")))' \
		"$(PYTHON_NEWEST)"
	$(STRICT) $(VENV_NEWEST)/bin/python -m pytest $(PYTEST_FLAGS) -m "not e2e" tests

# The end-to-end test on a booted systemd: needs root and systemd-nspawn.
e2e:
	@if [ "$$(id -u)" = 0 ] && command -v systemd-nspawn >/dev/null; then \
		$(STRICT) $(PYTHON) -m pytest $(PYTEST_FLAGS) -m e2e tests/e2e; \
	else echo "e2e: skipped (needs root and systemd-nspawn)"; fi

# The Debian package, built from a copy of the tree (nothing from .cache/ or build/
# gets into the source package) with a clean environment: a pyenv or venv on PATH
# must not leak into pybuild. The build runs the tests that need neither root nor a
# network (debian/rules). DEB_BUILD_OPTIONS=nocheck skips them.
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' certrelay/__init__.py)
DEB_DIR ?= build/deb
DEB_SOURCE = $(DEB_DIR)/certrelay-$(VERSION)

deb:
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_SOURCE)
	tar -c --exclude-vcs --exclude=./.cache --exclude=./build --exclude=./dist --exclude='./.venv*' \
		--exclude=./.pybuild --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
		--exclude='*.egg-info' . | tar -x -C $(DEB_SOURCE)
	cd $(DEB_SOURCE) && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$${HOME:-/root} LANG=C.UTF-8 \
		DEB_BUILD_OPTIONS="$(DEB_BUILD_OPTIONS)" dpkg-buildpackage --build=full --no-sign
	rm -rf $(DEB_SOURCE)
	@ls $(DEB_DIR)/certrelay_$(VERSION)_all.deb

# lintian on the .changes (source and binary); info and pedantic tags are shown too.
lintian:
	lintian --fail-on error,warning --display-info --pedantic $(DEB_DIR)/certrelay_$(VERSION)_*.changes

package:
	$(MAKE) --no-print-directory deb
	$(MAKE) --no-print-directory lintian

demo:
	sh demo/demo.sh

bench:
	$(PYTHON) benchmarks/run.py

# The README's quick start, as written, in a fresh minimal Debian 12 (tools/fresh-check).
fresh-check:
	tools/fresh-check

# Mutation testing (mutmut 3) of the code that runs after a renewal; not part of test.
mutants:
	tools/mutants

clean:
	rm -rf build .cache/venv-newest
