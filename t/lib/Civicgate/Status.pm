package Civicgate::Status;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::Status - what the status tests (t/status_*.t) share

=head1 SYNOPSIS

    use Civicgate::Test qw(:all);
    use Civicgate::Status qw(:all);

    my $t = Civicgate::Test->new;
    $t->write_nginx_conf(status_http(listen => 'reuseport',
        status => 'civicgate_status_heartbeat 1s;'), worker_processes => 2);
    $t->run_redis;
    $t->run;
    ok($t->wait_until(sub { reached_redis($t) }, timeout => 5));
    admin_service($t, PUT => 'tax', { state => 'degraded' });
    my $d = json_of($t->request('/status/'));
    is(state_of($d, 'tax'), 'degraded');

=head1 FUNCTIONS (exported on request, all with :all)

    $JSON                  JSON::PP, utf8 and canonical
    json_of($r)            a response's body (or a string) decoded, undef if
                           it is not JSON
    admin_service($t, $method, $name [, $body, %request_options])
                           $method /civicgate/admin/services/$name; a
                           reference body is sent as JSON, a string as it is
    service_of($d, $name)  the service of that name in a status document
    state_of($d, $name)    its state
    stale_of($d)           1 or 0 from the document's "stale", undef if it
                           has none
    fresh($d)              true if the document says "stale":false
    reached_redis($t, tries => $n, %request_options)
                           $n GET /status/ (default 1; more to reach every
                           worker) all answer "stale":false
    status_clients($t, $kind [, $port])
                           the civicgate_status_clients gauge of a kind
    status_http(%o)        an http block: civicgate_redis, a server with the
                           services tax and permits, /status/, the admin
                           API and /metrics.  o{redis}: after the Redis URL;
                           o{http}: more http-level lines; o{port}: the
                           listen port's name (0); o{listen}: more listen
                           parameters; o{status}: more lines in location
                           /status/; o{locations}: more locations

=cut

use strict;
use warnings;

use Exporter qw(import);
use JSON::PP ();
use Civicgate::Test qw(metric);

our @EXPORT_OK = qw($JSON json_of admin_service service_of state_of stale_of
    fresh reached_redis status_clients status_http);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

our $JSON = JSON::PP->new->utf8->canonical;

sub json_of {
    my ($r) = @_;
    return eval { $JSON->decode(ref $r ? $r->body // '' : $r // '') };
}

sub admin_service {
    my ($t, $method, $name, $body, %o) = @_;
    $body = $JSON->encode($body) if ref $body;
    return $t->request("/civicgate/admin/services/$name", method => $method,
        (defined $body ? (body => $body) : ()), %o);
}

sub service_of {
    my ($d, $name) = @_;
    return undef unless ref $d eq 'HASH' && ref $d->{services} eq 'ARRAY';
    my ($s) = grep { ($_->{name} // '') eq $name } @{ $d->{services} };
    return $s;
}

sub state_of {
    my $s = service_of(@_);
    return $s ? $s->{state} : undef;
}

sub stale_of {
    my ($d) = @_;
    return undef unless ref $d eq 'HASH' && JSON::PP::is_bool($d->{stale});
    return $d->{stale} ? 1 : 0;
}

sub fresh {
    return (stale_of($_[0]) // 1) == 0;
}

sub reached_redis {
    my ($t, %o) = @_;
    my $tries = delete $o{tries} // 1;
    for (1 .. $tries) {
        return 0 unless fresh(json_of($t->request('/status/', %o)));
    }
    return 1;
}

sub status_clients {
    my ($t, $kind, $port) = @_;
    return metric($t->metrics(defined $port ? (port => $port) : ()),
        'civicgate_status_clients', kind => $kind);
}

sub status_http {
    my (%o) = @_;
    my $listen = defined $o{listen} ? " $o{listen}" : '';
    my $port = $o{port} // 0;
    return <<"EOF";
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%@{[ $o{redis} // '' ]};
@{[ _indent(4, $o{http}) ]}
    server {
        listen 127.0.0.1:%%PORT_$port%%$listen;
        server_name localhost;

        location /tax/ {
            civicgate_service tax;
            return 200 "tax\\n";
        }
        location /permits/ {
            civicgate_service permits;
            return 200 "permits\\n";
        }
        location /status/ {
            civicgate_status;
@{[ _indent(12, $o{status}) ]}        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
        location = /metrics {
            civicgate_metrics;
        }
@{[ _indent(8, $o{locations}) ]}    }
EOF
}

# the lines of $text, each indented by $n spaces
sub _indent {
    my ($n, $text) = @_;
    return join '', map { ' ' x $n . "$_\n" } split /\n/, $text // '';
}

1;
