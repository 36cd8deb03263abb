#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# civicgate_jwks: the signing keys as a JWK Set (RFC 7517, RFC 8037): one
# OKP/Ed25519 key per civicgate_signing_key, in order, with the public
# key in "x" (checked against openssl's own), kid, use and alg; its
# content type, Cache-Control, a strong ETag and 304, HEAD, and 405
# problem+json for other methods.  Works without Redis.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Civicgate::Test qw(:all);
use Civicgate::Sign qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;

my $A = ed25519_key($t, 'a.pem');
my $B = ed25519_key($t, 'b.pem');

$t->write_nginx_conf(<<"EOF");
    civicgate_signing_key $A kid=gw-2027;
    civicgate_signing_key $B;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location = /.well-known/jwks.json {
            civicgate_jwks;
        }
    }
EOF

$t->run;

sub raw_public {
    my ($pem) = @_;
    my $der = qx{openssl pkey -in '$pem' -pubout -outform DER};
    my $x = MIME::Base64::encode_base64(substr($der, -32), '');
    $x =~ tr{+/}{-_};
    $x =~ s/=+$//;
    return $x;
}

my $r = $t->request('/.well-known/jwks.json');
is($r->status, 200, 'GET: 200');
is($r->header('Content-Type'), 'application/jwk-set+json',
    'Content-Type application/jwk-set+json');
is($r->header('Cache-Control'), 'public, max-age=300',
    'Cache-Control: public, max-age=300');
my $etag = $r->header('ETag');
like($etag // '', qr/^"[0-9a-f]{16}"$/, 'strong ETag');

my $set = eval { $JSON->decode($r->body) };
ok(ref $set eq 'HASH' && ref $set->{keys} eq 'ARRAY', '{"keys":[...]}')
    or diag $r->body;
is(scalar @{ $set->{keys} }, 2, 'two keys');

my @want = ([ $A, 'gw-2027' ], [ $B, undef ]);
for my $i (0, 1) {
    my $k = $set->{keys}[$i];
    is_deeply([ sort keys %$k ], [ qw(alg crv kid kty use x) ],
        "key $i: exactly kty, crv, x, kid, use, alg");
    is($k->{kty}, 'OKP', "key $i: kty OKP");
    is($k->{crv}, 'Ed25519', "key $i: crv Ed25519");
    is($k->{use}, 'sig', "key $i: use sig");
    is($k->{alg}, 'EdDSA', "key $i: alg EdDSA");
    is($k->{x}, raw_public($want[$i][0]),
        "key $i: x is the raw public key, base64url without padding");
    if (defined $want[$i][1]) {
        is($k->{kid}, $want[$i][1], "key $i: the configured kid");
    } else {
        like($k->{kid}, qr/^[A-Za-z0-9_-]{11}$/, "key $i: derived kid");
    }
}

# a JWK's x makes a PEM key that openssl reads
{
    my $pem = jwk_pem($set->{keys}[0]{x});
    my $p = $t->write_file('from-jwk.pem', $pem);
    my $from = qx{openssl pkey -pubin -in '$p' -outform DER};
    my $orig = qx{openssl pkey -in '$A' -pubout -outform DER};
    is(unpack('H*', $from), unpack('H*', $orig),
        'the PEM built from x is the key\'s own public key');
}

$r = $t->request('/.well-known/jwks.json',
    headers => [ 'If-None-Match' => $etag ]);
is($r->status, 304, 'If-None-Match: 304');
is($r->body, '', '304: no body');

$r = $t->request('/.well-known/jwks.json',
    headers => [ 'If-None-Match' => '"0000000000000000"' ]);
is($r->status, 200, 'another ETag: 200');

$r = $t->request('/.well-known/jwks.json', method => 'HEAD');
is($r->status, 200, 'HEAD: 200');
is($r->body, '', 'HEAD: no body');

for my $m (qw(POST PUT DELETE)) {
    $r = $t->request('/.well-known/jwks.json', method => $m, body => '{}');
    is($r->status, 405, "$m: 405");
    like($r->header('Content-Type') // '', qr{^application/problem\+json},
        "$m: problem+json");
    is($r->header('Allow'), 'GET, HEAD', "$m: Allow GET, HEAD");
}

$t->done_testing;
