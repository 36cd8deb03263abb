#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The digest a rate-limit key value is stored under, computed here
# independently: with a secret file, HMAC-SHA256 under the limit subkey of
# the pseudonym key; without one, plain SHA-256 (no key is shared by the
# gateways then), as docs/security.md and docs/redis-keys.md say.  The
# same digest names the Redis key and gives the RateLimit "pk" parameter.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA qw(sha256 hmac_sha256);
use MIME::Base64 qw(encode_base64);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $plain = $t->nginx('plain');

my $SIGNING = random_key_hex(32);
my $PSEUDONYM = random_key_hex(32);

$t->write_secret_file('keys', [ [ sign => $SIGNING ], [ pn => $PSEUDONYM ] ]);
$_->write_file('file.txt', "static\n") for $t, $plain;
$t->run_redis;

my $conf = <<'EOF';
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=2s;

    civicgate_limit_zone $http_x_key zone=red:1m rate=1r/m store=redis;
    civicgate_limit_zone $http_x_key zone=loc:1m rate=1r/m store=local;

    server {
        listen 127.0.0.1:%%PORT%%;

        location = /red {
            civicgate_limit zone=red burst=5 nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /loc {
            civicgate_limit zone=loc burst=5 nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF

(my $keyed = $conf) =~ s/%%PORT%%/%%PORT_0%%/;
$t->write_nginx_conf("    civicgate_secret_file %%TESTDIR%%/keys "
    . "pseudonym_key=pn;\n" . $keyed);
(my $unkeyed = $conf) =~ s/%%PORT%%/%%PORT_plain%%/;
$plain->write_nginx_conf($unkeyed);

$t->run;
$plain->run;

sub pk {
    my ($port, $path, $key) = @_;
    my $r = $t->request($path, headers => [ 'X-Key' => $key ],
        port => $t->port($port));
    is($r->status, 200, "$path admitted");
    my ($pk) = ($r->header('RateLimit') // '') =~ /;pk=:([^:]*):/;
    return $pk // '';
}

sub b64 { return encode_base64($_[0], '') }

my $subkey = hkdf_sha256(pack('H*', $PSEUDONYM), 'civicgate limit key v1', 32);
my $keyed_digest = substr(hmac_sha256('citizen-a', $subkey), 0, 16);

is(pk(0, '/red', 'citizen-a'), b64(substr($keyed_digest, 0, 12)),
    'secret file, store=redis: pk is the keyed digest');
is(pk(0, '/loc', 'citizen-a'), b64(substr($keyed_digest, 0, 12)),
    'secret file, store=local: pk is the keyed digest');
is(join(' ', $t->redis_scan_keys('cg:{l:*}:red')),
    'cg:{l:' . unpack('H*', $keyed_digest) . '}:red',
    'secret file: the Redis key is named by HMAC-SHA256 under the limit '
    . 'subkey of the pseudonym key');

my $sha = substr(sha256('citizen-b'), 0, 16);

is(pk('plain', '/red', 'citizen-b'), b64(substr($sha, 0, 12)),
    'no secret file, store=redis: pk is plain SHA-256');
is(pk('plain', '/loc', 'citizen-b'), b64(substr($sha, 0, 12)),
    'no secret file, store=local: pk is plain SHA-256');
ok(scalar(grep { $_ eq 'cg:{l:' . unpack('H*', $sha) . '}:red' }
    $t->redis_scan_keys('cg:{l:*}:red')),
    'no secret file: the Redis key is named by plain SHA-256');

$t->done_testing;
