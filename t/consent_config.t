#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Consent configuration errors: "nginx -t" fails with [emerg], a message
# naming what is wrong or missing, and "in .../nginx.conf:LINE" pointing at
# the offending directive (or purpose line).  Valid configurations pass.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $SECRET = "civicgate_secret_file %%TOPDIR%%/keys;\n";
my $REDIS = "civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;\n";
my $PURPOSES = <<'EOF';
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax    "Perpajakan"        "Taxation";
    }
EOF

# a server with $loc inside; civicgate_citizen at server level unless $nocit
sub server {
    my ($loc, %o) = @_;
    my $cit = $o{nocit} ? '' : "        civicgate_citizen \$http_x_citizen_id;\n";
    return <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
$cit
        location /svc/ {
$loc
            proxy_pass http://127.0.0.1:%%PORT_0%%/echo/;
        }
        location /echo/ {
            civicgate_consent off;    # answered by "return": never checked
            return 200 "ok\\n";
        }
    }
EOF
}

# name, http block, regex (or list of regexes) of the line nginx must point
# at, regex the output must match
my @cases = (
    {
        name => 'civicgate_consent without civicgate_redis',
        http => $SECRET . $PURPOSES
            . server('            civicgate_consent health;'),
        line => qr/civicgate_consent health;/,
        like => qr/"civicgate_consent" requires "civicgate_redis"/,
    },
    {
        name => 'civicgate_consent without civicgate_secret_file',
        http => $REDIS . $PURPOSES
            . server('            civicgate_consent health;'),
        line => [ qr/civicgate_consent health;/, qr/civicgate_citizen/ ],
        like => qr/civicgate_secret_file/,
    },
    {
        name => 'civicgate_consent without civicgate_citizen',
        http => $SECRET . $REDIS . $PURPOSES
            . server('            civicgate_consent health;', nocit => 1),
        line => qr/civicgate_consent health;/,
        like => qr/"civicgate_consent" requires "civicgate_citizen"/,
    },
    {
        name => 'civicgate_consent without civicgate_consent_purposes',
        http => $SECRET . $REDIS
            . server('            civicgate_consent health;'),
        line => qr/civicgate_consent health;/,
        like => qr/"civicgate_consent" requires "civicgate_consent_purposes"/,
    },
    {
        name => 'unknown consent purpose',
        http => $SECRET . $REDIS . $PURPOSES
            . server('            civicgate_consent health nope;'),
        line => qr/civicgate_consent health nope;/,
        like => qr/unknown consent purpose "nope"/,
    },
    {
        name => 'unknown consent purpose at server level',
        http => $SECRET . $REDIS . $PURPOSES
            . server('            civicgate_consent off;')
              =~ s/(server_name localhost;)/$1\n        civicgate_consent research;/r,
        line => qr/civicgate_consent research;/,
        like => qr/unknown consent purpose "research"/,
    },
    {
        name => 'purpose line with 2 tokens',
        http => $SECRET . $REDIS . <<'EOF' . server(''),
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax "Perpajakan";
    }
EOF
        line => qr/tax "Perpajakan";/,
        like => qr/purpose|label/i,
    },
    {
        name => 'purpose line with 4 tokens',
        http => $SECRET . $REDIS . <<'EOF' . server(''),
    civicgate_consent_purposes {
        tax "Perpajakan" "Taxation" "Steuer";
    }
EOF
        line => qr/"Steuer"/,
        like => qr/purpose|label/i,
    },
    {
        name => 'purpose line with a name only',
        http => $SECRET . $REDIS . <<'EOF' . server(''),
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax;
    }
EOF
        line => qr/^\s*tax;/,
        like => qr/purpose|label/i,
    },
    {
        name => 'duplicate purpose',
        http => $SECRET . $REDIS . <<'EOF' . server(''),
    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax "Perpajakan" "Taxation";
        health "Kesehatan" "Health";
    }
EOF
        line => qr/health "Kesehatan" "Health";/,
        like => qr/duplicate.*health|health.*duplicate/i,
    },
    {
        name => 'invalid purpose name (upper case)',
        http => $SECRET . $REDIS . <<'EOF' . server(''),
    civicgate_consent_purposes {
        Health "Layanan kesehatan" "Health services";
    }
EOF
        line => qr/Health "Layanan/,
        like => qr/Health/,
    },
    {
        name => 'invalid purpose name (65 characters)',
        http => $SECRET . $REDIS . "    civicgate_consent_purposes {\n        "
            . ('p' x 65) . " \"a\" \"b\";\n    }\n" . server(''),
        line => qr/p{65}/,
        like => qr/p{65}/,
    },
    {
        name => 'empty purposes block (one line)',
        http => $SECRET . $REDIS . "    civicgate_consent_purposes { }\n"
            . server(''),
        line => qr/civicgate_consent_purposes \{ \}/,
        like => qr/has no purposes/,
    },
    {
        name => 'empty purposes block (over lines)',
        http => $SECRET . $REDIS . "    civicgate_consent_purposes {\n"
            . "        # nothing yet\n    } # end of purposes\n" . server(''),
        line => [ qr/civicgate_consent_purposes \{/, qr/# end of purposes/ ],
        like => qr/has no purposes/,
    },
    {
        name => 'two purposes blocks',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_consent_purposes { # the second\n        research \"a\" \"b\";\n    } # end of the second\n"
            . server(''),
        line => [ qr/research "a" "b";/, qr/# the second/, qr/# end of the second/ ],
        like => qr/duplicate/,
    },
    {
        name => '256 purposes (max 255)',
        http => $SECRET . $REDIS . "    civicgate_consent_purposes {\n"
            . join('', map { "        p$_ \"l$_\" \"L$_\";\n" } 1 .. 256)
            . "    } # end of purposes\n" . server(''),
        line => [ qr/p256 "l256"/, qr/# end of purposes/ ],
        like => qr/purposes/,
    },
    {
        name => 'purposes block in a server',
        http => $SECRET . $REDIS . server('')
            =~ s/(server_name localhost;)/$1\n$PURPOSES/r,
        line => qr/civicgate_consent_purposes \{/,
        like => qr/"civicgate_consent_purposes" directive is not allowed here/,
    },
    {
        name => 'more than 8 purposes in civicgate_consent',
        http => $SECRET . $REDIS . "    civicgate_consent_purposes {\n"
            . join('', map { "        p$_ \"l$_\" \"L$_\";\n" } 1 .. 9)
            . "    }\n"
            . server('            civicgate_consent p1 p2 p3 p4 p5 p6 p7 p8 p9;'),
        line => qr/civicgate_consent p1 p2/,
        like => qr/civicgate_consent|p9/,
    },
    {
        name => 'civicgate_consent with a bad on_error',
        http => $SECRET . $REDIS . $PURPOSES
            . server('            civicgate_consent health on_error=maybe;'),
        line => qr/on_error=maybe/,
        like => qr/on_error=maybe/,
    },
    {
        name => 'civicgate_consent without a purpose',
        http => $SECRET . $REDIS . $PURPOSES
            . server('            civicgate_consent on_error=allow;'),
        line => qr/civicgate_consent on_error=allow;/,
        like => qr/civicgate_consent/,
    },
    {
        name => 'civicgate_consent_cache zone too small',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_consent_cache zone=cc:16k;\n"
            . server('            civicgate_consent health;'),
        line => qr/civicgate_consent_cache zone=cc:16k;/,
        like => qr/too small/,
    },
    {
        name => 'civicgate_consent_cache bad ttl',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_consent_cache zone=cc:1m ttl=soon;\n"
            . server('            civicgate_consent health;'),
        line => qr/civicgate_consent_cache zone=cc:1m ttl=soon;/,
        like => qr/ttl=soon/,
    },
    {
        name => 'civicgate_consent_cache bad negative_ttl',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_consent_cache zone=cc:1m negative_ttl=-1s;\n"
            . server('            civicgate_consent health;'),
        line => qr/negative_ttl=-1s/,
        like => qr/negative_ttl=-1s/,
    },
    {
        name => 'civicgate_consent_cache without zone',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_consent_cache ttl=5s;\n"
            . server('            civicgate_consent health;'),
        line => qr/civicgate_consent_cache ttl=5s;/,
        like => qr/zone/,
    },
    {
        name => 'civicgate_consent_cache zone without size',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_consent_cache zone=cc;\n"
            . server('            civicgate_consent health;'),
        line => qr/civicgate_consent_cache zone=cc;/,
        like => qr/zone=cc/,
    },
    {
        name => 'civicgate_consent_cache in a server',
        http => $SECRET . $REDIS . $PURPOSES . server('')
            =~ s/(server_name localhost;)/$1\n        civicgate_consent_cache zone=cc:1m;/r,
        line => qr/civicgate_consent_cache zone=cc:1m;/,
        like => qr/"civicgate_consent_cache" directive is not allowed here/,
    },
    {
        name => 'civicgate_consent_api without civicgate_citizen',
        http => $SECRET . $REDIS . $PURPOSES . server('', nocit => 1)
            =~ s{(location /echo/)}{location /consents/ {\n            civicgate_consent_api;\n        }\n        $1}r,
        line => qr/civicgate_consent_api;/,
        like => qr/"civicgate_consent_api" requires "civicgate_citizen"/,
    },
    {
        name => 'civicgate_consent_api without civicgate_redis',
        http => $SECRET . $PURPOSES . server('')
            =~ s{(location /echo/)}{location /consents/ {\n            civicgate_consent_api;\n        }\n        $1}r,
        line => qr/civicgate_consent_api;/,
        like => qr/"civicgate_consent_api" requires "civicgate_redis"/,
    },
    {
        name => 'civicgate_consent_api without purposes',
        http => $SECRET . $REDIS . server('')
            =~ s{(location /echo/)}{location /consents/ {\n            civicgate_consent_api;\n        }\n        $1}r,
        line => qr/civicgate_consent_api;/,
        like => qr/"civicgate_consent_api" requires "civicgate_consent_purposes"/,
    },
);

my $k = 0;
for my $c (@cases) {
    my $i = $t->nginx('c' . ++$k);
    $i->write_nginx_conf($c->{http});
    my ($rc, $out) = $i->test_config;
    my $name = $c->{name};
    isnt($rc, 0, "$name: nginx -t fails") or next;
    like($out, qr/\[emerg\]/, "$name: [emerg]");
    like($out, $c->{like}, "$name: message") or diag $out;
    my $conf = $i->testdir . '/nginx.conf';
    # every line that matches one of the regexes is acceptable
    my @all = split /\n/, $i->read_file('nginx.conf'), -1;
    my @lines;
    for my $re (ref $c->{line} eq 'ARRAY' ? @{ $c->{line} } : ($c->{line})) {
        push @lines, grep { $all[$_ - 1] =~ $re } 1 .. @all;
    }
    @lines = grep { $_ >= $c->{lineno_min} } @lines if $c->{lineno_min};
    my %ok = map { $_ => 1 } @lines;
    my ($got) = $out =~ / in \Q$conf\E:(\d+)/;
    ok(defined $got && $ok{$got}, "$name: points at nginx.conf:"
        . join('|', sort { $a <=> $b } keys %ok)
        . ' (the offending directive)')
        or diag "got line " . ($got // 'none') . ":\n$out";
}

###########################################################################
# valid configurations pass

my @good = (
    {
        name => 'full consent configuration',
        http => $SECRET . $REDIS . $PURPOSES . <<'EOF'
    civicgate_consent_cache zone=cc:32k ttl=60s negative_ttl=500ms;
    civicgate_consent_grant_url https://portal.example/consents;
EOF
            . server('            civicgate_consent health tax on_error=allow;')
              =~ s{(location /echo/)}{location /consents/ {\n            civicgate_consent_api;\n        }\n        location /civicgate/admin/ {\n            civicgate_admin;\n        }\n        $1}r,
    },
    {
        name => 'inherited from http, off in a location, citizen at http',
        http => $SECRET . $REDIS . $PURPOSES
            . "    civicgate_citizen \$http_x_citizen_id;\n"
            . "    civicgate_consent health on_error=deny;\n"
            . server('            civicgate_consent off;', nocit => 1),
    },
    {
        name => 'eight purposes in one directive, 255 purposes listed',
        http => $SECRET . $REDIS . "    civicgate_consent_purposes {\n"
            . join('', map { "        p$_ \"l$_\" \"L$_\";\n" } 1 .. 255)
            . "    }\n"
            . server('            civicgate_consent p1 p2 p3 p4 p5 p6 p7 p255;'),
    },
    {
        name => 'purposes listed but no civicgate_consent: no redis needed',
        http => $SECRET . $PURPOSES . server(''),
    },
);

for my $c (@good) {
    my $i = $t->nginx('g' . ++$k);
    $i->write_nginx_conf($c->{http});
    my ($rc, $out) = $i->test_config;
    is($rc, 0, "$c->{name}: nginx -t passes") or diag $out;
}

$t->done_testing;
