"""Deactivate every valid authorization that certbot's ACME accounts hold at a Pebble.

Run by tests/acme.py before each `certbot renew`, with the certbot venv's Python (it has
certbot's `acme` and `josepy`): python deactivate_authzs.py CONFIG_DIR DIRECTORY_URL,
with REQUESTS_CA_BUNDLE set to the CA that Pebble's HTTPS certificate chains to.

Why: Pebble (Debian 12's 2.4.0, and upstream since) creates a new authorization for an
identifier only `if authz == nil || rand.Intn(100) > wfe.authzReusePercent`
(wfe/wfe.go, makeAuthorizations). With PEBBLE_AUTHZREUSE=0 that is false when
rand.Intn(100) returns 0, so 1 identifier in 100 still gets the account's valid
authorization back; no challenge is needed, certbot's auth hook is never called and a
renewal that was to fail succeeds. A deactivated authorization is never reused
(db/memorystore.go, FindValidAuthorization takes only StatusValid), so after this the
account must validate every identifier again. certbot's --dry-run does the same
(auth_handler.deactivate_valid_authorizations) for the same reason.

Out: one JSON line, {"deactivated": [identifier, ...]}. Reaches only the authorizations
of orders Pebble lists for the account: it leaves out invalid orders (those with an
invalid or expired authorization), so a valid authorization whose only order is
invalid stays; our hooks never answer a refused challenge, so they make no such order.
Exit status 1 with a message on stderr if anything fails.
"""

import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

import josepy as jose
from acme import client, messages


def signing_algorithm(key):
    """Return the JWS algorithm for an account key: RS256, or ES256/384/512 by curve."""
    if isinstance(key, jose.JWKEC):
        return {256: jose.ES256, 384: jose.ES384, 521: jose.ES512}[key.key.curve.key_size]
    return jose.RS256


def accounts(config_dir, directory_url):
    """Yield (RegistrationResource, JWK) for certbot's accounts at the server of `directory_url`."""
    origin = "{0.scheme}://{0.netloc}/".format(urlsplit(directory_url))
    for regr_path in sorted(Path(config_dir, "accounts").glob("**/regr.json")):
        regr = messages.RegistrationResource.json_loads(regr_path.read_text())
        if regr.uri and regr.uri.startswith(origin):
            yield regr, jose.JWK.json_loads((regr_path.parent / "private_key.json").read_text())


def deactivate_valid_authorizations(directory_url, regr, key):
    """Deactivate the valid authorizations of one account; return their identifiers."""
    net = client.ClientNetwork(key, account=regr, alg=signing_algorithm(key),
                               user_agent="certrelay-tests")
    directory = client.ClientV2.get_directory(directory_url, net)
    acme = client.ClientV2(directory, net)

    def post_as_get(url):
        return net.post(url, None, new_nonce_url=directory["newNonce"])

    # All pages first: deactivating changes order statuses, and so Pebble's pages.
    order_urls, page = [], post_as_get(regr.uri).json()["orders"]
    while page:
        response = post_as_get(page)
        order_urls += response.json().get("orders") or []
        page = response.links.get("next", {}).get("url")
    authz_urls = dict.fromkeys(url for order in order_urls
                               for url in post_as_get(order).json()["authorizations"])
    deactivated = []
    for url in authz_urls:
        authzr = messages.AuthorizationResource(
            body=messages.Authorization.from_json(post_as_get(url).json()), uri=url)
        if authzr.body.status != messages.STATUS_VALID:
            continue
        done = acme.deactivate_authorization(authzr)
        if done.body.status != messages.STATUS_DEACTIVATED:
            raise RuntimeError(f"{url}: status {done.body.status} after deactivation")
        deactivated.append(("*." if authzr.body.wildcard else "") + authzr.body.identifier.value)
    return deactivated


def main(config_dir, directory_url):
    deactivated = []
    for regr, key in accounts(config_dir, directory_url):
        deactivated += deactivate_valid_authorizations(directory_url, regr, key)
    print(json.dumps({"deactivated": deactivated}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: deactivate_authzs.py CONFIG_DIR DIRECTORY_URL")
    main(*sys.argv[1:])
