#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The status page over plain HTTP: one self-contained HTML document under
# 30 KB, with the current status rendered in it; a Content-Security-Policy
# whose hashes are those of the page's own inline script and style, and
# nothing loaded from elsewhere; every value from an operator or a
# request escaped (a hostile message renders inert); the language by
# ?lang= and Accept-Language; the notice and journey forms without
# JavaScript; the hidden data-use part only when configured; 405 for
# POST; and the configuration errors of the directive.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA qw(sha256_base64);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /tax/ {
            civicgate_journey on;
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /health/ {
            civicgate_service health-records;
            return 200 "health\n";
        }
        location /status/ {
            civicgate_status;
        }
        location = / {
            civicgate_status_page;
        }
        location = /en {
            civicgate_status_page status=/status cookie=jid
                                  uses=/consents/uses;
            civicgate_status_language en;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
    }
EOF

$t->run_redis;
$t->run;

sub page {
    my ($path, @h) = @_;
    return $t->request($path, headers => \@h);
}

# the worker has read the status from Redis
ok($t->wait_until(sub { fresh(json_of($t->request('/status/'))) },
                  timeout => 10), 'status read from Redis');

my $r = page('/');
is($r->status, 200, 'page: 200');
like($r->header('Content-Type'), qr{^text/html; charset=utf-8$},
     'page: text/html in UTF-8');
my $body = $r->body;
my $size = length $body;
cmp_ok($size, '<=', 30 * 1024, "page: $size bytes, at most 30 KB");
diag("page size: $size bytes");
is($r->header('Content-Length'), $size, 'page: Content-Length');
like($body, qr/^<!DOCTYPE html>\n<html lang="id">/,
     'page: Indonesian by default');
like($body, qr{<li data-name="tax"><h3>tax</h3><p><span class="badge s-operational">Beroperasi normal</span></p></li>},
     'page: a service rendered with its state');
like($body, qr{<li data-name="health-records">}, 'page: every service');
like($body, qr{<p id="stale" class="stale" hidden>}, 'page: not stale');
like($body, qr{<p id="live" class="live" role="status" aria-live="polite">},
     'page: an aria-live region for changes');
is($r->header('Content-Language'), 'id', 'page: Content-Language');
like($r->header('Vary') // '', qr/Accept-Language/, 'page: Vary');
is($r->header('X-Content-Type-Options'), 'nosniff', 'page: nosniff');

# the policy: hashes of exactly the inline script and style, nothing else

my $csp = $r->header('Content-Security-Policy') // '';
unlike($csp, qr/unsafe-inline|unsafe-eval|\*/,
       'CSP: no unsafe-inline, no wildcard');
like($csp, qr/default-src 'none'/, "CSP: default-src 'none'");
my @scripts = $body =~ m{<script>(.*?)</script>}gs;
my @styles = $body =~ m{<style>(.*?)</style>}gs;
is(scalar @scripts, 1, 'one inline script');
is(scalar @styles, 1, 'one inline style');
my ($js_hash) = $csp =~ /script-src 'sha256-([^']+)'/;
my ($css_hash) = $csp =~ /style-src 'sha256-([^']+)'/;
sub b64pad { my $s = shift; $s .= '=' while length($s) % 4; $s }
is($js_hash, b64pad(sha256_base64($scripts[0] // '')),
   'CSP: script-src is the hash of the inline script');
is($css_hash, b64pad(sha256_base64($styles[0] // '')),
   'CSP: style-src is the hash of the inline style');
unlike($body,
       qr/<script[^>]*\ssrc=|<link[^>]*\shref=|<img|<iframe|\sstyle=|\son[a-z]+=/i,
       'no external script, stylesheet, image, inline style or handler');
unlike($body, qr{(?:https?:)?//[a-z0-9]}i, 'no URL of another host');
like($body, qr{data-status="/status/"}, 'status location: the default');

# escaping: a hostile message set through the admin endpoint

my $evil = q{<script>alert(1)</script><img src=x onerror=alert(2)>"'&};
my $a = admin_service($t, 'PUT', 'tax', { state => 'outage',
    message => { id => $evil, en => "Down </li><b>bold</b>" } });
is($a->status, 200, 'hostile message stored');
ok($t->wait_until(sub { (state_of(json_of($t->request('/status/')), 'tax')
                         // '') eq 'outage' }, timeout => 5),
   'status shows the change');

$body = page('/')->body;
like($body, qr{<p class="msg">&lt;script&gt;alert\(1\)&lt;/script&gt;&lt;img src=x onerror=alert\(2\)&gt;&quot;&#39;&amp;</p>},
     'hostile message escaped');
is(scalar(() = $body =~ /<script/g), 1, 'no script element but the page\'s');
unlike($body, qr/<img/, 'no element from the message');
like($body, qr{<span id="overall-state"><span class="badge s-outage">Tidak tersedia</span>},
     'overall state rendered');
$body = page('/?lang=en')->body;
like($body, qr{<p class="msg">Down &lt;/li&gt;&lt;b&gt;bold&lt;/b&gt;</p>},
     'the English message, escaped');

# random messages: whatever the bytes, no markup gets through

my @chars = ('<', '>', '&', '"', "'", '/', '=', ' ', 'a', 'script', "\t",
             "\x{e9}", "\x01", '`');
for my $i (1 .. 20) {
    my $msg = join '', map { $chars[int rand @chars] } 1 .. 40;
    admin_service($t, 'PUT', 'health-records',
                  { state => 'degraded', message => { en => $msg } });
    my $want = $JSON->encode([$msg]);
    $t->wait_until(sub {
        my $d = json_of($t->request('/status/?lang=en'));
        my $s = service_of($d, 'health-records');
        $s && $JSON->encode([$s->{message}]) eq $want;
    }, timeout => 5);
    my $b = page('/?lang=en')->body;
    my ($text) = $b =~ m{<li data-name="health-records">.*?<p class="msg">([^<]*)</p>}s;
    my @bad = $b =~ /(<(?!!DOCTYPE|\/?(?:html|head|meta|title|style|body|a|header|nav|h[123]|main|section|p|span|time|ul|li|div|form|input|label|button|strong|footer|script)[\s>]).{0,20})/gs;
    ok(defined $text && !@bad, "random message $i: only the page's own "
       . 'elements') or diag(explain [$msg, \@bad]);
}

# languages

like(page('/?lang=en')->body, qr/<html lang="en">.*<h1>Service status/s,
     '?lang=en');
like(page('/', 'Accept-Language' => 'en-GB,en;q=0.9,id;q=0.5')->body,
     qr/<html lang="en">/, 'Accept-Language: en preferred');
like(page('/', 'Accept-Language' => 'fr, en;q=0.5, id;q=0.8')->body,
     qr/<html lang="id">/, 'Accept-Language: the higher q wins');
like(page('/?lang=id', 'Accept-Language' => 'en')->body,
     qr/<html lang="id">/, '?lang= wins over Accept-Language');
like(page('/?lang=all')->body, qr/<html lang="id">/,
     '?lang=all: the default language');
like(page('/en')->body, qr/<html lang="en">/,
     'civicgate_status_language of the page location');
like(page('/en?lang=all')->body, qr/<html lang="en">/,
     '?lang=all: the default of the page location');
like(page('/')->body,
     qr{<a href="\?lang=id" hreflang="id" lang="id" aria-current="true">Bahasa Indonesia</a> <a href="\?lang=en" hreflang="en" lang="en">English</a>},
     'language switch: links, the current one marked');

# notices, without JavaScript

$body = page('/?notice=7kq2m-xt0yb')->body;
like($body, qr{data-notice="7KQ2M-XT0YB"}, 'notice: code for the script');
like($body, qr{<a href="/status/notices/7KQ2M-XT0YB">7KQ2M-XT0YB</a>},
     'notice: a link to the notice endpoint');
like($body, qr{<input id="notice" name="notice"[^>]* value="7KQ2M-XT0YB">},
     'notice: the form keeps the code');
$body = page('/?notice=%3Cscript%3Ex%3C%2Fscript%3E')->body;
like($body, qr{<div id="notice-result" role="status" aria-live="polite" class="result bad"><strong>Tidak resmi},
     'notice: not a code, not official');
like($body, qr{value="&lt;script&gt;x&lt;/script&gt;"}, 'notice: escaped');
unlike($body, qr/data-notice/, 'notice: not given to the script');
is(page('/status/notices/7KQ2M-XT0YB')->status, 404,
   'a code the gateway did not issue: 404');

# journeys: typed in, or from the cookie; only IDs that verify are shown

my $jid = $t->request('/tax/')->header('X-Journey-ID');
like($jid, journey_id_re(), 'a journey');
(my $lower = lc $jid) =~ s/-//g;
$body = page("/?journey=$lower")->body;
like($body, qr{data-journey="\Q$jid\E"},
     'journey: canonical ID for the script');
like($body, qr{<a href="/status/journeys/\Q$jid\E">},
     'journey: a link to the timeline');
$body = page('/', Cookie => "cg_journey=$jid")->body;
like($body, qr{data-journey="\Q$jid\E"}, 'journey: from the cookie');
like($body, qr{<input id="journey" name="journey"[^>]* value="\Q$jid\E">},
     'journey: the form filled in');
unlike(page('/en', Cookie => "cg_journey=$jid")->body, qr/data-journey/,
       'journey: another cookie name configured');
like(page('/en', Cookie => "jid=$jid")->body, qr{data-journey="\Q$jid\E"},
     'journey: cookie=');
my $forged = mint_journey_id(random_key_hex(32));
$body = page("/?journey=$forged")->body;
unlike($body, qr/data-journey/, 'journey: a forged ID is not followed');
like($body, qr{class="result bad">Perjalanan tidak ditemukan},
     'journey: a forged ID is not found');
$body = page('/', Cookie => "cg_journey=$forged")->body;
unlike($body, qr/data-journey|result bad/,
       'journey: a forged cookie is ignored');
like(page('/?journey=%22%3E%3Cb%3E')->body, qr{value="&quot;&gt;&lt;b&gt;"},
     'journey: escaped');

# the data-use part: only where configured, hidden

unlike(page('/')->body, qr/id="uses"|data-uses/, 'uses: off by default');
$body = page('/en')->body;
like($body, qr{<section id="uses" hidden aria-labelledby="h-uses">},
     'uses: a hidden section');
like($body, qr{data-uses="/consents/uses"}, 'uses: its URI for the script');
like($body, qr{data-status="/status/"}, 'status=: a slash added');

# methods

$r = $t->request('/', method => 'POST', body => 'x=1');
is($r->status, 405, 'POST: 405');
is($r->header('Allow'), 'GET, HEAD', 'POST: Allow');
like($r->header('Content-Type'), qr{^application/problem\+json},
     'POST: problem+json');
$r = $t->request('/', method => 'HEAD');
is($r->status, 200, 'HEAD: 200');
is($r->body, '', 'HEAD: no body');

# Redis away: the last state seen, marked stale

$t->stop_redis;
ok($t->wait_until(sub { page('/')->body =~ /<p id="stale" class="stale">/ },
                  timeout => 10), 'stale without Redis');
like(page('/')->body, qr/s-outage/, 'stale: the last state seen');
$t->run_redis;

# configuration errors

my $n = 0;
for my $case (
    [ 'civicgate_status_page status=http://x/;',
      qr/must be a path on this server/ ],
    [ 'civicgate_status_page status=//x/;',
      qr/must be a path on this server/ ],
    [ 'civicgate_status_page uses=/a<b;', qr/invalid character/ ],
    [ 'civicgate_status_page colour=red;',
      qr/invalid parameter "colour=red"/ ],
    [ 'civicgate_status_page; civicgate_status_page;', qr/is duplicate/ ],
    [ 'civicgate_status_page;', qr/requires a location with "civicgate_status"/,
      1 ],
) {
    my ($line, $re, $nostatus) = @$case;
    my $status = $nostatus ? '' : 'location /status/ { civicgate_status; }';
    my $b = $t->nginx('bad' . $n++);
    $b->write_nginx_conf(<<"CONF");
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    server {
        listen 127.0.0.1:%%PORT_9%%;
        $status
        location / { $line }
    }
CONF
    my ($rc, $out) = $b->test_config;
    ok($rc != 0 && $out =~ $re, "nginx -t fails: $line") or diag($out);
}

$t->done_testing;
