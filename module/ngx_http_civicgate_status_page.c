
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>

#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_util.h"
#include "ngx_http_civicgate_codec.h"
#include "ngx_http_civicgate_compat.h"


/*
 * The status page for people: one HTML document, rendered from the
 * worker's copy of the status so that it works without JavaScript, then
 * kept live by its script from the status location (Server-Sent Events,
 * long-poll when they fail).  The script and the style are inline and
 * allowed by their hashes in the page's Content-Security-Policy.
 */


#define NGX_HTTP_CIVICGATE_PAGE_BUF     8192
#define NGX_HTTP_CIVICGATE_PAGE_INPUT   64     /* a typed code or ID */
#define NGX_HTTP_CIVICGATE_PAGE_STATES  5


typedef struct {
    ngx_str_t                      csp;       /* the header's value */
    ngx_uint_t                     used;
} ngx_http_civicgate_page_main_conf_t;


typedef struct {
    ngx_str_t                      status;    /* ends with "/" */
    ngx_str_t                      uses;      /* empty: no data-use part */
    ngx_str_t                      cookie;    /* empty: no journey cookie */
} ngx_http_civicgate_page_loc_conf_t;


/* the page as it is written: buffers chained in the request pool */
typedef struct {
    ngx_http_request_t            *request;
    ngx_chain_t                   *first;
    ngx_chain_t                  **last;
    ngx_buf_t                     *buf;
    size_t                         len;
    ngx_uint_t                     error;
} ngx_http_civicgate_page_out_t;


/* what the request asks for, besides the status */
typedef struct {
    ngx_uint_t                     lang;
    ngx_str_t                      notice;    /* as typed; len 0: none */
    ngx_str_t                      journey;   /* as typed; len 0: none */
    u_char                         jid[NGX_HTTP_CIVICGATE_JID_LEN];
    u_char                         notice_data[NGX_HTTP_CIVICGATE_PAGE_INPUT];
    u_char                         journey_data[NGX_HTTP_CIVICGATE_PAGE_INPUT];

    unsigned                       notice_code:1;  /* looks like a code */
    unsigned                       jid_valid:1;    /* jid holds an ID */
} ngx_http_civicgate_page_ask_t;


typedef struct {
    const char                    *lang;
    const char                    *title;
    const char                    *skip;
    const char                    *switch_label;
    const char                    *overall;
    const char                    *updated;
    const char                    *stale;
    const char                    *services;
    const char                    *still;
    const char                    *since;
    const char                    *until;
    const char                    *states[NGX_HTTP_CIVICGATE_PAGE_STATES];
    const char                    *notice_title;
    const char                    *notice_intro;
    const char                    *notice_label;
    const char                    *check;
    const char                    *notice_fake;
    const char                    *notice_link;
    const char                    *journey_title;
    const char                    *journey_intro;
    const char                    *journey_label;
    const char                    *journey_none;
    const char                    *journey_link;
    const char                    *uses_title;
    const char                    *uses_intro;
    const char                    *data;
} ngx_http_civicgate_page_text_t;


static char *ngx_http_civicgate_status_page(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_civicgate_page_uri(ngx_conf_t *cf, ngx_str_t *value,
    ngx_str_t *uri, ngx_uint_t slash);
static void *ngx_http_civicgate_page_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_civicgate_page_create_loc_conf(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_page_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_page_hash(ngx_conf_t *cf,
    const char *text, u_char *out);
static ngx_int_t ngx_http_civicgate_page_handler(ngx_http_request_t *r);
static void ngx_http_civicgate_page_read(ngx_http_request_t *r,
    ngx_http_civicgate_page_ask_t *ask);
static size_t ngx_http_civicgate_page_arg(ngx_http_request_t *r,
    char *name, u_char *buf);
static void ngx_http_civicgate_page_journey(ngx_http_request_t *r,
    ngx_http_civicgate_page_ask_t *ask);
static ngx_int_t ngx_http_civicgate_page_headers(ngx_http_request_t *r,
    ngx_http_civicgate_page_ask_t *ask);
static ngx_int_t ngx_http_civicgate_page_header(ngx_http_request_t *r,
    const char *name, ngx_str_t *value);
static void ngx_http_civicgate_page_head(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    ngx_http_civicgate_page_ask_t *ask);
static void ngx_http_civicgate_page_status(ngx_http_civicgate_page_out_t *o,
    const ngx_http_civicgate_page_text_t *t, json_t *doc);
static void ngx_http_civicgate_page_service(ngx_http_civicgate_page_out_t *o,
    const ngx_http_civicgate_page_text_t *t, json_t *s);
static void ngx_http_civicgate_page_badge(ngx_http_civicgate_page_out_t *o,
    const ngx_http_civicgate_page_text_t *t, json_t *state);
static void ngx_http_civicgate_page_time(ngx_http_civicgate_page_out_t *o,
    json_t *time);
static void ngx_http_civicgate_page_notice(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    ngx_http_civicgate_page_ask_t *ask);
static void ngx_http_civicgate_page_journeys(
    ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    ngx_http_civicgate_page_ask_t *ask);
static void ngx_http_civicgate_page_tail(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    const ngx_http_civicgate_page_text_t *t);
static void ngx_http_civicgate_page_form(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_ask_t *ask, const char *name,
    const char *label, u_char *value, size_t len);
static void ngx_http_civicgate_page_raw(ngx_http_civicgate_page_out_t *o,
    const u_char *p, size_t len);
static void ngx_http_civicgate_page_cstr(ngx_http_civicgate_page_out_t *o,
    const char *s);
static void ngx_http_civicgate_page_text(ngx_http_civicgate_page_out_t *o,
    const u_char *p, size_t len);
static void ngx_http_civicgate_page_json(ngx_http_civicgate_page_out_t *o,
    json_t *v);


#define ngx_http_civicgate_page_str(o, s)                                     \
    ngx_http_civicgate_page_raw(o, (u_char *) s, sizeof(s) - 1)


static const char  *ngx_http_civicgate_page_states[] = {
    "operational", "maintenance", "degraded", "outage", "unknown"
};


static const ngx_http_civicgate_page_text_t  ngx_http_civicgate_page_texts[] = {

    { "id",
      "Status layanan",
      "Langsung ke isi",
      "Bahasa",
      "Keadaan umum:",
      "Diperbarui:",
      "Status ini mungkin tidak terbaru: gateway sedang tidak dapat "
      "mengikuti perubahan.",
      "Layanan",
      "Halaman ini menampilkan status saat dimuat; muat ulang untuk "
      "memperbarui.",
      "Sejak",
      "Perkiraan selesai",
      { "Beroperasi normal", "Pemeliharaan", "Terganggu sebagian",
        "Tidak tersedia", "Tidak diketahui" },
      "Periksa pemberitahuan",
      "Menerima pesan tentang layanan ini lewat SMS atau media sosial? "
      "Masukkan kodenya untuk memastikan pesan itu resmi.",
      "Kode pemberitahuan",
      "Periksa",
      "Tidak resmi: kode ini bukan pemberitahuan resmi.",
      "Lihat hasil pemeriksaan:",
      "Perjalanan Anda",
      "Masukkan ID perjalanan Anda untuk melihat langkah-langkahnya di "
      "semua kanal. Tidak ada data pribadi yang ditampilkan.",
      "ID perjalanan",
      "Perjalanan tidak ditemukan (atau sudah kedaluwarsa).",
      "Lihat langkah-langkahnya:",
      "Penggunaan data Anda",
      "Layanan yang menggunakan data Anda dengan persetujuan Anda.",
      "Data untuk aplikasi:" },

    { "en",
      "Service status",
      "Skip to content",
      "Language",
      "Overall:",
      "Updated:",
      "This status may be out of date: the gateway cannot follow changes "
      "at the moment.",
      "Services",
      "This page shows the status as it was when loaded; reload it to "
      "update.",
      "Since",
      "Expected until",
      { "Operational", "Maintenance", "Degraded", "Outage", "Unknown" },
      "Verify a notice",
      "Received a message about these services by SMS or on social media? "
      "Enter its code to make sure it is official.",
      "Notice code",
      "Check",
      "Not official: this code is not an official notice.",
      "See the result of the check:",
      "Your journey",
      "Enter your journey ID to see its steps across channels. No personal "
      "data is shown.",
      "Journey ID",
      "No such journey (or it has expired).",
      "See its steps:",
      "Use of your data",
      "Services that used your data with your consent.",
      "Machine-readable data:" }
};


/* allowed by its hash: any change here changes the policy with it */
static const char  ngx_http_civicgate_page_css[] =
    "*{box-sizing:border-box}\n"
    "body{\n"
    "  margin:0;\n"
    "  font:16px/1.5 system-ui,sans-serif;\n"
    "  color:#1a1a1a;\n"
    "  background:#fff}\n"
    "header,main,footer{max-width:48rem;margin:0 auto;padding:0 1rem}\n"
    "header{padding-top:.5rem}\n"
    "h1{font-size:1.6rem;margin:.5rem 0}\n"
    "h2{\n"
    "  font-size:1.25rem;\n"
    "  margin:1.5rem 0 .5rem;\n"
    "  border-bottom:2px solid #d0d0d0}\n"
    "h3{font-size:1.05rem;margin:0;overflow-wrap:anywhere}\n"
    "a{color:#0645ad}\n"
    "a:focus,button:focus,input:focus{\n"
    "  outline:3px solid #b35900;\n"
    "  outline-offset:2px}\n"
    ".skip{position:absolute;left:-999px}\n"
    ".skip:focus{left:1rem;top:.5rem;background:#fff;padding:.25rem}\n"
    "nav{display:flex;gap:1rem;justify-content:flex-end;flex-wrap:wrap}\n"
    "nav a[aria-current]{font-weight:700;color:#1a1a1a}\n"
    "ul.svc,ol.steps{list-style:none;padding:0;margin:0}\n"
    ".svc li{\n"
    "  border:1px solid #c8c8c8;\n"
    "  border-radius:.4rem;\n"
    "  padding:.6rem .8rem;\n"
    "  margin:.5rem 0}\n"
    ".svc p,.steps li{margin:.25rem 0}\n"
    ".badge{\n"
    "  display:inline-block;\n"
    "  padding:.1rem .5rem;\n"
    "  border-radius:.3rem;\n"
    "  color:#fff;\n"
    "  background:#595959;\n"
    "  font-weight:700}\n"
    ".s-operational{background:#0a6b2e}\n"
    ".s-maintenance{background:#1f4e9e}\n"
    ".s-degraded{background:#8a4b00}\n"
    ".s-outage{background:#b00020}\n"
    ".when,.conn,.note{color:#4a4a4a;font-size:.9rem}\n"
    ".stale{background:#fff4d6;border:1px solid #8a4b00;padding:.4rem .6rem}\n"
    ".live{min-height:1.5rem;font-weight:700}\n"
    "form{display:flex;flex-wrap:wrap;gap:.5rem;align-items:flex-end}\n"
    "label{display:block;width:100%}\n"
    "input{\n"
    "  font:inherit;\n"
    "  padding:.4rem;\n"
    "  border:1px solid #595959;\n"
    "  border-radius:.3rem;\n"
    "  min-width:0;\n"
    "  flex:1 1 12rem}\n"
    "button{\n"
    "  font:inherit;\n"
    "  padding:.4rem 1rem;\n"
    "  border:0;\n"
    "  border-radius:.3rem;\n"
    "  background:#0645ad;\n"
    "  color:#fff;\n"
    "  cursor:pointer}\n"
    ".result{\n"
    "  margin:.75rem 0;\n"
    "  padding:.5rem .75rem;\n"
    "  border-left:4px solid #595959}\n"
    ".ok{border-color:#0a6b2e}\n"
    ".bad{border-color:#b00020}\n"
    ".steps li{border-bottom:1px solid #e0e0e0;padding:.3rem 0}\n"
    "footer{margin-top:2rem;padding-bottom:1rem}\n";


static const char  ngx_http_civicgate_page_js[] =
    "(function () {\n"
    "'use strict';\n"
    "var T = {\n"
    "  id: {\n"
    "    operational: 'Beroperasi normal', maintenance: 'Pemeliharaan',\n"
    "    degraded: 'Terganggu sebagian', outage: 'Tidak tersedia',\n"
    "    unknown: 'Tidak diketahui', since: 'Sejak',\n"
    "    until: 'Perkiraan selesai',\n"
    "    now: 'kini', live: 'Pembaruan langsung aktif.',\n"
    "    poll: 'Pembaruan berkala aktif.',\n"
    "    off: 'Pembaruan terputus; mencoba lagi.',\n"
    "    checking: 'Memeriksa...', official: 'Pemberitahuan resmi',\n"
    "    fake: 'Tidak resmi: kode ini bukan pemberitahuan resmi.',\n"
    "    error: 'Tidak dapat memeriksa sekarang; coba lagi nanti.',\n"
    "    nojourney: 'Perjalanan tidak ditemukan (atau sudah kedaluwarsa).',\n"
    "    steps: 'Langkah perjalanan', via: 'melalui',\n"
    "    '1xx': 'diproses', '2xx': 'berhasil', '3xx': 'dialihkan',\n"
    "    '4xx': 'ditolak (periksa permintaan)',\n"
    "    '5xx': 'gagal (masalah layanan)'\n"
    "  },\n"
    "  en: {\n"
    "    operational: 'Operational', maintenance: 'Maintenance',\n"
    "    degraded: 'Degraded', outage: 'Outage',\n"
    "    unknown: 'Unknown', since: 'Since', until: 'Expected until',\n"
    "    now: 'now', live: 'Live updates on.',\n"
    "    poll: 'Periodic updates on.',\n"
    "    off: 'Updates interrupted; retrying.',\n"
    "    checking: 'Checking...', official: 'Official notice',\n"
    "    fake: 'Not official: this code is not an official notice.',\n"
    "    error: 'Cannot check now; try again later.',\n"
    "    nojourney: 'No such journey (or it has expired).',\n"
    "    steps: 'Journey steps', via: 'via',\n"
    "    '1xx': 'in progress', '2xx': 'succeeded', '3xx': 'redirected',\n"
    "    '4xx': 'refused (check the request)',\n"
    "    '5xx': 'failed (service problem)'\n"
    "  }\n"
    "};\n"
    "var D = document.body.dataset, lang = D.lang === 'en' ? 'en' : 'id';\n"
    "var L = T[lang], base = D.status, doc = null, etag = null;\n"
    "var follow = null;\n"
    "\n"
    "function $(id) { return document.getElementById(id); }\n"
    "\n"
    "function el(tag, cls, text) {\n"
    "  var e = document.createElement(tag);\n"
    "  if (cls) { e.className = cls; }\n"
    "  if (text !== undefined && text !== null) { e.textContent = text; }\n"
    "  return e;\n"
    "}\n"
    "\n"
    "function when(s) {\n"
    "  var t = el('time', null,\n"
    "             s.slice(0, 10) + ' ' + s.slice(11, 16) + ' UTC');\n"
    "  t.dateTime = s;\n"
    "  return t;\n"
    "}\n"
    "\n"
    "function badge(state) {\n"
    "  return el('span', 'badge s-' + state, L[state] || state);\n"
    "}\n"
    "\n"
    "function fill(node, kids) {\n"
    "  while (node.firstChild) { node.removeChild(node.firstChild); }\n"
    "  kids.forEach(function (k) {\n"
    "    node.appendChild(typeof k === 'string'\n"
    "                     ? document.createTextNode(k) : k);\n"
    "  });\n"
    "}\n"
    "\n"
    "function service(s) {\n"
    "  var li = el('li'), p = el('p'), w;\n"
    "  li.dataset.name = s.name;\n"
    "  li.appendChild(el('h3', null, s.name));\n"
    "  p.appendChild(badge(s.state));\n"
    "  li.appendChild(p);\n"
    "  if (s.message) { li.appendChild(el('p', 'msg', s.message)); }\n"
    "  if (s.since || s.until) {\n"
    "    w = el('p', 'when');\n"
    "    if (s.since) { fill(w, [L.since + ' ', when(s.since)]); }\n"
    "    if (s.until) {\n"
    "      w.appendChild(document.createTextNode((s.since ? '; ' : '')\n"
    "                                            + L.until + ' '));\n"
    "      w.appendChild(when(s.until));\n"
    "    }\n"
    "    li.appendChild(w);\n"
    "  }\n"
    "  return li;\n"
    "}\n"
    "\n"
    "function render() {\n"
    "  fill($('services'), doc.services.map(service));\n"
    "  fill($('overall-state'), [badge(doc.overall)]);\n"
    "  if (doc.updated_at) { fill($('updated-at'), [when(doc.updated_at)]); }\n"
    "  $('stale').hidden = !doc.stale;\n"
    "}\n"
    "\n"
    "function announce(next) {\n"
    "  var old = {}, said = [];\n"
    "  if (doc) { doc.services.forEach(function (s) { old[s.name] = s; }); }\n"
    "  next.services.forEach(function (s) {\n"
    "    var o = old[s.name];\n"
    "    if (doc && (!o || o.state !== s.state || o.message !== s.message)) {\n"
    "      said.push(s.name + ' ' + L.now + ': ' + (L[s.state] || s.state)\n"
    "                + (s.message ? ' (' + s.message + ')' : ''));\n"
    "    }\n"
    "  });\n"
    "  if (said.length) { $('live').textContent = said.join('. ') + '.'; }\n"
    "}\n"
    "\n"
    "function update(next) {\n"
    "  announce(next);\n"
    "  doc = next;\n"
    "  render();\n"
    "}\n"
    "\n"
    "function change(c) {\n"
    "  var next;\n"
    "  if (!doc) { return; }\n"
    "  next = JSON.parse(JSON.stringify(doc));\n"
    "  next.overall = c.overall;\n"
    "  delete c.overall;\n"
    "  next.updated_at = c.updated_at || next.updated_at;\n"
    "  next.services = next.services.map(function (s) {\n"
    "    return s.name === c.name ? c : s;\n"
    "  });\n"
    "  update(next);\n"
    "}\n"
    "\n"
    "function conn(what) { $('conn').textContent = L[what]; }\n"
    "\n"
    "function poll() {\n"
    "  var h = {};\n"
    "  if (etag) { h['If-None-Match'] = etag; }\n"
    "  fetch(base + '?lang=' + lang + (etag ? '&wait=50' : ''),\n"
    "        { headers: h, cache: 'no-store' }).then(function (r) {\n"
    "    if (r.status === 304) { conn('poll'); return poll(); }\n"
    "    if (r.status !== 200) { throw new Error(r.status); }\n"
    "    etag = r.headers.get('ETag');\n"
    "    return r.json().then(function (j) {\n"
    "      update(j);\n"
    "      conn('poll');\n"
    "      poll();\n"
    "    });\n"
    "  }).catch(function () { conn('off'); setTimeout(poll, 5000); });\n"
    "}\n"
    "\n"
    "function live() {\n"
    "  var es;\n"
    "  if (!window.EventSource) { return poll(); }\n"
    "  es = new EventSource(base + '?lang=' + lang);\n"
    "  es.addEventListener('snapshot', function (e) {\n"
    "    update(JSON.parse(e.data));\n"
    "    conn('live');\n"
    "  });\n"
    "  es.addEventListener('service', function (e) {\n"
    "    change(JSON.parse(e.data));\n"
    "    conn('live');\n"
    "  });\n"
    "  es.onerror = function () {\n"
    "    /* refused (too many clients) or not a stream: long-poll instead */\n"
    "    if (es.readyState === 2) {\n"
    "      es.close();\n"
    "      poll();\n"
    "    } else {\n"
    "      conn('off');\n"
    "    }\n"
    "  };\n"
    "}\n"
    "\n"
    "function result(id, cls, kids) {\n"
    "  var r = $(id);\n"
    "  r.className = 'result ' + cls;\n"
    "  fill(r, kids);\n"
    "}\n"
    "\n"
    "function notice(code) {\n"
    "  code = code.trim().toUpperCase();\n"
    "  if (!/^[0-9A-Z-]{1,32}$/.test(code)) {\n"
    "    return result('notice-result', 'bad', [el('strong', null, L.fake)]);\n"
    "  }\n"
    "  result('notice-result', '', [L.checking]);\n"
    "  fetch(base + 'notices/' + encodeURIComponent(code),\n"
    "        { cache: 'no-store' })\n"
    "    .then(function (r) {\n"
    "      if (r.status === 404) {\n"
    "        return result('notice-result', 'bad',\n"
    "                      [el('strong', null, L.fake)]);\n"
    "      }\n"
    "      if (r.status !== 200) { throw new Error(r.status); }\n"
    "      return r.json().then(function (n) {\n"
    "        var m = n.message || {};\n"
    "        result('notice-result', 'ok', [\n"
    "               el('strong', null, L.official), ' ',\n"
    "               el('span', null, n.code || code), el('br'),\n"
    "               n.service + ': ',\n"
    "               badge(n.state), ' ', m[lang] || m.id || m.en || '', ' ',\n"
    "               n.time ? when(n.time) : '']);\n"
    "      });\n"
    "    }).catch(function () {\n"
    "      result('notice-result', 'bad', [L.error]);\n"
    "    });\n"
    "}\n"
    "\n"
    "function step(s) {\n"
    "  return el('li', null, s.time.slice(0, 10) + ' ' + s.time.slice(11, 19)\n"
    "            + ' UTC, ' + (s.service || '-') + ' ' + L.via + ' '\n"
    "            + s.channel\n"
    "            + ': ' + (L[s.outcome] || s.outcome));\n"
    "}\n"
    "\n"
    "function journey(id) {\n"
    "  var list = el('ol', 'steps'), n = 0;\n"
    "  if (follow) { follow.close(); follow = null; }\n"
    "  result('journey-result', '', [L.checking]);\n"
    "  fetch(base + 'journeys/' + encodeURIComponent(id.trim()),\n"
    "        { cache: 'no-store' })\n"
    "    .then(function (r) {\n"
    "      if (r.status === 404) {\n"
    "        return result('journey-result', 'bad', [L.nojourney]);\n"
    "      }\n"
    "      if (r.status !== 200) { throw new Error(r.status); }\n"
    "      return r.json().then(function (j) {\n"
    "        fill(list, j.steps.map(step));\n"
    "        n = j.steps.length;\n"
    "        result('journey-result', 'ok', [el('strong', null, L.steps + ' '\n"
    "               + j.journey), list]);\n"
    "        if (!window.EventSource) { return; }\n"
    "        /* new steps are added to the list: only they are announced */\n"
    "        follow = new EventSource(base + 'journeys/' + j.journey);\n"
    "        follow.addEventListener('snapshot', function (e) {\n"
    "          var s = JSON.parse(e.data).steps;\n"
    "          if (s.length !== n) { fill(list, s.map(step)); n = s.length; }\n"
    "        });\n"
    "        follow.addEventListener('step', function (e) {\n"
    "          list.appendChild(step(JSON.parse(e.data)));\n"
    "          n++;\n"
    "        });\n"
    "      });\n"
    "    }).catch(function () {\n"
    "      result('journey-result', 'bad', [L.error]);\n"
    "    });\n"
    "}\n"
    "\n"
    "function uses() {\n"
    "  /* the data-use log: shown only when the gateway answers it */\n"
    "  fetch(D.uses, { cache: 'no-store', credentials: 'same-origin' })\n"
    "    .then(function (r) { return r.status === 200 ? r.json() : null; })\n"
    "    .then(function (j) {\n"
    "      if (!j || !Array.isArray(j.uses)) { return; }\n"
    "      fill($('uses-list'), j.uses.map(function (u) {\n"
    "        var l = u.label || {}, li = el('li');\n"
    "        li.appendChild(when(u.time));\n"
    "        li.appendChild(document.createTextNode(': '\n"
    "            + (l[lang] || l.id || u.purpose) + ' \\u2014 '\n"
    "            + (u.service || '-') + ' ' + L.via + ' ' + u.channel));\n"
    "        return li;\n"
    "      }));\n"
    "      $('uses').hidden = false;\n"
    "    }).catch(function () {});\n"
    "}\n"
    "\n"
    "function intercept(form, input, fn) {\n"
    "  $(form).addEventListener('submit', function (e) {\n"
    "    e.preventDefault();\n"
    "    fn($(input).value);\n"
    "  });\n"
    "}\n"
    "\n"
    "intercept('notice-form', 'notice', notice);\n"
    "intercept('journey-form', 'journey', journey);\n"
    "if (D.notice) { notice(D.notice); }\n"
    "if (D.journey) { journey(D.journey); }\n"
    "if (D.uses) { uses(); }\n"
    "if (base) { live(); }\n"
    "}());\n";


static ngx_command_t  ngx_http_civicgate_page_commands[] = {

    { ngx_string("civicgate_status_page"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS|NGX_CONF_TAKE123,
      ngx_http_civicgate_status_page,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_status_page_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_page_postconfiguration, /* postconfiguration */

    ngx_http_civicgate_page_create_main_conf, /* create main conf */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_page_create_loc_conf, /* create location conf */
    NULL                                   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_status_page_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_status_page_module_ctx, /* module context */
    ngx_http_civicgate_page_commands,      /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* civicgate_status_page [status=URI] [cookie=NAME|off] [uses=URI] */

static char *
ngx_http_civicgate_status_page(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_page_loc_conf_t *plcf = conf;

    char                                 *rv;
    ngx_str_t                            *value;
    ngx_uint_t                            i;
    ngx_http_core_loc_conf_t             *clcf;
    ngx_http_civicgate_page_main_conf_t  *pmcf;

    if (plcf->status.data != NULL) {
        return "is duplicate";
    }

    ngx_str_set(&plcf->status, "/status/");
    ngx_str_set(&plcf->cookie, "cg_journey");

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "status=", 7) == 0) {
            value[i].data += 7;
            value[i].len -= 7;
            rv = ngx_http_civicgate_page_uri(cf, &value[i], &plcf->status, 1);

        } else if (ngx_strncmp(value[i].data, "uses=", 5) == 0) {
            value[i].data += 5;
            value[i].len -= 5;
            rv = ngx_http_civicgate_page_uri(cf, &value[i], &plcf->uses, 0);

        } else if (ngx_strncmp(value[i].data, "cookie=", 7) == 0
                   && value[i].len > 7)
        {
            plcf->cookie.data = value[i].data + 7;
            plcf->cookie.len = value[i].len - 7;

            if (ngx_strcmp(plcf->cookie.data, "off") == 0) {
                ngx_str_null(&plcf->cookie);
            }

            continue;

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_page_handler;

    pmcf = ngx_http_conf_get_module_main_conf(cf,
                                     ngx_http_civicgate_status_page_module);
    pmcf->used = 1;

    return NGX_CONF_OK;
}


/* a path on this server: the page's policy allows nothing else */

static char *
ngx_http_civicgate_page_uri(ngx_conf_t *cf, ngx_str_t *value, ngx_str_t *uri,
    ngx_uint_t slash)
{
    u_char      *p;
    ngx_uint_t   i;

    if (value->len == 0 || value->data[0] != '/'
        || (value->len > 1 && value->data[1] == '/'))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must be a path on this server, "
                           "starting with \"/\"", value);
        return NGX_CONF_ERROR;
    }

    for (i = 0; i < value->len; i++) {
        if (value->data[i] <= ' ' || value->data[i] >= 0x7f
            || ngx_strchr("\"'<>\\?#", value->data[i]) != NULL)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid character in \"%V\"", value);
            return NGX_CONF_ERROR;
        }
    }

    if (!slash || value->data[value->len - 1] == '/') {
        *uri = *value;
        return NGX_CONF_OK;
    }

    p = ngx_pnalloc(cf->pool, value->len + 1);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memcpy(p, value->data, value->len);
    p[value->len] = '/';

    uri->data = p;
    uri->len = value->len + 1;

    return NGX_CONF_OK;
}


static void *
ngx_http_civicgate_page_create_main_conf(ngx_conf_t *cf)
{
    /*
     * set by ngx_pcalloc():
     *
     *     pmcf->csp = { 0, NULL };
     *     pmcf->used = 0;
     */

    return ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_page_main_conf_t));
}


static void *
ngx_http_civicgate_page_create_loc_conf(ngx_conf_t *cf)
{
    /*
     * set by ngx_pcalloc():
     *
     *     plcf->status = { 0, NULL };     (NULL: not a status page)
     *     plcf->uses = { 0, NULL };
     *     plcf->cookie = { 0, NULL };
     */

    return ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_page_loc_conf_t));
}


static ngx_int_t
ngx_http_civicgate_page_postconfiguration(ngx_conf_t *cf)
{
    u_char                               *p;
    u_char                                js[64], css[64];
    ngx_http_civicgate_status_conf_t     *scf;
    ngx_http_civicgate_page_main_conf_t  *pmcf;

    pmcf = ngx_http_conf_get_module_main_conf(cf,
                                     ngx_http_civicgate_status_page_module);
    if (!pmcf->used) {
        return NGX_OK;
    }

    /* the page follows the status the workers keep for civicgate_status */
    scf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_civicgate_status_module);
    if (!scf->used) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"civicgate_status_page\" requires a location with "
                      "\"civicgate_status\"");
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_page_hash(cf, ngx_http_civicgate_page_js, js)
        != NGX_OK
        || ngx_http_civicgate_page_hash(cf, ngx_http_civicgate_page_css, css)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(cf->pool, 512);
    if (p == NULL) {
        return NGX_ERROR;
    }

    pmcf->csp.data = p;
    pmcf->csp.len = ngx_snprintf(p, 512,
                        "default-src 'none'; script-src 'sha256-%s'; "
                        "style-src 'sha256-%s'; connect-src 'self'; "
                        "form-action 'self'; base-uri 'none'; "
                        "frame-ancestors 'none'", js, css)
                    - p;

    return NGX_OK;
}


/* base64 of the SHA-256 of an inline script or style, NUL-terminated */

static ngx_int_t
ngx_http_civicgate_page_hash(ngx_conf_t *cf, const char *text, u_char *out)
{
    u_char        md[EVP_MAX_MD_SIZE];
    ngx_str_t     src, dst;
    unsigned int  len;

    if (EVP_Digest(text, ngx_strlen(text), md, &len, EVP_sha256(), NULL)
        != 1)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "civicgate: SHA-256 of the status page failed");
        return NGX_ERROR;
    }

    src.data = md;
    src.len = len;
    dst.data = out;

    ngx_encode_base64(&dst, &src);
    out[dst.len] = '\0';

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_page_handler(ngx_http_request_t *r)
{
    json_t                              *doc;
    ngx_int_t                            rc;
    ngx_str_t                            body;
    ngx_http_civicgate_page_ask_t        ask;
    ngx_http_civicgate_page_out_t        o;
    ngx_http_civicgate_page_loc_conf_t  *plcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_http_civicgate_method_not_allowed(r, "GET, HEAD");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    plcf = ngx_http_get_module_loc_conf(r,
                                        ngx_http_civicgate_status_page_module);

    ngx_http_civicgate_page_read(r, &ask);

    /* NGX_DECLINED (no status in this process): rendered as unknown */
    rc = ngx_http_civicgate_status_document(ask.lang, &body);
    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    doc = (rc == NGX_OK) ? json_loadb((char *) body.data, body.len, 0, NULL)
                         : NULL;

    ngx_memzero(&o, sizeof(ngx_http_civicgate_page_out_t));
    o.request = r;
    o.last = &o.first;

    ngx_http_civicgate_page_head(&o, plcf, &ask);
    ngx_http_civicgate_page_status(&o, &ngx_http_civicgate_page_texts[ask.lang],
                                   doc);
    ngx_http_civicgate_page_notice(&o, plcf, &ask);
    ngx_http_civicgate_page_journeys(&o, plcf, &ask);
    ngx_http_civicgate_page_tail(&o, plcf,
                                 &ngx_http_civicgate_page_texts[ask.lang]);

    json_decref(doc);

    if (o.error || o.first == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    o.buf->last_buf = (r == r->main) ? 1 : 0;
    o.buf->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = o.len;

    if (ngx_http_civicgate_page_headers(r, &ask) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, o.first);
}


/* ?lang=, ?notice=, ?journey= and the journey cookie */

static void
ngx_http_civicgate_page_read(ngx_http_request_t *r,
    ngx_http_civicgate_page_ask_t *ask)
{
    size_t                                 i;
    u_char                                *p, c;
    ngx_uint_t                             lang;
    ngx_http_civicgate_status_loc_conf_t  *slcf;

    ngx_memzero(ask, sizeof(ngx_http_civicgate_page_ask_t));

    lang = ngx_http_civicgate_status_lang(r);

    /* ?lang=all is for programs: a page is in one language, the default */
    if (lang == NGX_HTTP_CIVICGATE_LANG_ALL) {
        slcf = ngx_http_get_module_loc_conf(r,
                                            ngx_http_civicgate_status_module);
        lang = slcf->status_language;
    }

    ask->lang = (lang == NGX_HTTP_CIVICGATE_LANG_EN)
                ? NGX_HTTP_CIVICGATE_LANG_EN : NGX_HTTP_CIVICGATE_LANG_ID;

    ask->notice.data = ask->notice_data;
    ask->notice.len = ngx_http_civicgate_page_arg(r, "notice",
                                                  ask->notice_data);
    ask->notice_code = (ask->notice.len > 0 && ask->notice.len <= 32);

    p = ask->notice.data;

    for (i = 0; i < ask->notice.len; i++) {
        c = ngx_tolower(p[i]);

        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || c == '-')) {
            ask->notice_code = 0;
        }
    }

    for (i = 0; ask->notice_code && i < ask->notice.len; i++) {
        p[i] = ngx_toupper(p[i]);
    }

    ngx_http_civicgate_page_journey(r, ask);
}


/* an argument, URL-decoded into buf; 0 if absent, empty or too long */

static size_t
ngx_http_civicgate_page_arg(ngx_http_request_t *r, char *name, u_char *buf)
{
    u_char     *src, *dst, tmp[3 * NGX_HTTP_CIVICGATE_PAGE_INPUT];
    ngx_str_t   arg;

    if (ngx_http_arg(r, (u_char *) name, ngx_strlen(name), &arg) != NGX_OK
        || arg.len == 0 || arg.len > 3 * NGX_HTTP_CIVICGATE_PAGE_INPUT)
    {
        return 0;
    }

    /* decoding never lengthens; the result's length is checked after */
    src = arg.data;
    dst = tmp;
    ngx_unescape_uri(&dst, &src, arg.len, NGX_UNESCAPE_URI);

    if (dst - tmp > NGX_HTTP_CIVICGATE_PAGE_INPUT) {
        return 0;
    }

    ngx_memcpy(buf, tmp, dst - tmp);

    return dst - tmp;
}


/* the ID typed in, else the journey cookie's; shown only if it verifies */

static void
ngx_http_civicgate_page_journey(ngx_http_request_t *r,
    ngx_http_civicgate_page_ask_t *ask)
{
    u_char                               raw[NGX_HTTP_CIVICGATE_JID_RAW];
    ngx_str_t                            value;
    ngx_http_civicgate_main_conf_t      *cgmcf;
    ngx_http_civicgate_page_loc_conf_t  *plcf;

    plcf = ngx_http_get_module_loc_conf(r,
                                        ngx_http_civicgate_status_page_module);
    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    ask->journey.data = ask->journey_data;
    ask->journey.len = ngx_http_civicgate_page_arg(r, "journey",
                                                   ask->journey_data);
    value = ask->journey;

    if (value.len == 0
        && (plcf->cookie.len == 0
            || ngx_http_civicgate_cookie(r, &plcf->cookie, &value) != NGX_OK
            || value.len > NGX_HTTP_CIVICGATE_JID_INPUT_MAX))
    {
        return;
    }

    if (cgmcf->keyring != NULL
        && ngx_http_civicgate_jid_parse(value.data, value.len, raw) == 0
        && ngx_http_civicgate_jid_verify(cgmcf->keyring, raw) >= 0)
    {
        ngx_http_civicgate_jid_format(raw, ask->jid);
        ask->jid_valid = 1;
    }
}


static ngx_int_t
ngx_http_civicgate_page_headers(ngx_http_request_t *r,
    ngx_http_civicgate_page_ask_t *ask)
{
    ngx_str_t                             v;
    ngx_http_civicgate_page_main_conf_t  *pmcf;

    pmcf = ngx_http_get_module_main_conf(r,
                                        ngx_http_civicgate_status_page_module);

    ngx_str_set(&r->headers_out.content_type, "text/html; charset=utf-8");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    if (ngx_http_civicgate_page_header(r, "Content-Security-Policy",
                                       &pmcf->csp) != NGX_OK)
    {
        return NGX_ERROR;
    }

    v.data = (u_char *) ngx_http_civicgate_page_texts[ask->lang].lang;
    v.len = 2;

    if (ngx_http_civicgate_page_header(r, "Content-Language", &v) != NGX_OK) {
        return NGX_ERROR;
    }

    /* the page may show the journey of the browser's own cookie */
    ngx_str_set(&v, "private, no-cache");
    if (ngx_http_civicgate_page_header(r, "Cache-Control", &v) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_str_set(&v, "Accept-Language, Cookie");
    if (ngx_http_civicgate_page_header(r, "Vary", &v) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_str_set(&v, "nosniff");
    if (ngx_http_civicgate_page_header(r, "X-Content-Type-Options", &v)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_str_set(&v, "no-referrer");

    return ngx_http_civicgate_page_header(r, "Referrer-Policy", &v);
}


static ngx_int_t
ngx_http_civicgate_page_header(ngx_http_request_t *r, const char *name,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value = *value;

    return NGX_OK;
}


static void
ngx_http_civicgate_page_head(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    ngx_http_civicgate_page_ask_t *ask)
{
    ngx_uint_t                             en;
    const ngx_http_civicgate_page_text_t  *t;

    t = &ngx_http_civicgate_page_texts[ask->lang];
    en = (ask->lang == NGX_HTTP_CIVICGATE_LANG_EN);

    ngx_http_civicgate_page_str(o, "<!DOCTYPE html>\n<html lang=\"");
    ngx_http_civicgate_page_cstr(o, t->lang);
    ngx_http_civicgate_page_str(o, "\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, "
        "initial-scale=1\">\n<title>");
    ngx_http_civicgate_page_cstr(o, t->title);
    ngx_http_civicgate_page_str(o, "</title>\n<style>");
    ngx_http_civicgate_page_cstr(o, ngx_http_civicgate_page_css);
    ngx_http_civicgate_page_str(o, "</style>\n</head>\n<body data-lang=\"");
    ngx_http_civicgate_page_cstr(o, t->lang);
    ngx_http_civicgate_page_str(o, "\" data-status=\"");
    ngx_http_civicgate_page_text(o, plcf->status.data, plcf->status.len);

    if (plcf->uses.len) {
        ngx_http_civicgate_page_str(o, "\" data-uses=\"");
        ngx_http_civicgate_page_text(o, plcf->uses.data, plcf->uses.len);
    }

    if (ask->notice_code) {
        ngx_http_civicgate_page_str(o, "\" data-notice=\"");
        ngx_http_civicgate_page_text(o, ask->notice.data, ask->notice.len);
    }

    if (ask->jid_valid) {
        ngx_http_civicgate_page_str(o, "\" data-journey=\"");
        ngx_http_civicgate_page_raw(o, ask->jid, NGX_HTTP_CIVICGATE_JID_LEN);
    }

    ngx_http_civicgate_page_str(o, "\">\n<a class=\"skip\" href=\"#main\">");
    ngx_http_civicgate_page_cstr(o, t->skip);
    ngx_http_civicgate_page_str(o, "</a>\n<header>\n<nav aria-label=\"");
    ngx_http_civicgate_page_cstr(o, t->switch_label);

    /* links, so that the switch works without the script */
    ngx_http_civicgate_page_str(o, "\"><a href=\"?lang=id\" hreflang=\"id\" "
                                "lang=\"id\"");
    if (!en) {
        ngx_http_civicgate_page_str(o, " aria-current=\"true\"");
    }

    ngx_http_civicgate_page_str(o, ">Bahasa Indonesia</a> "
                                "<a href=\"?lang=en\" hreflang=\"en\" "
                                "lang=\"en\"");
    if (en) {
        ngx_http_civicgate_page_str(o, " aria-current=\"true\"");
    }

    ngx_http_civicgate_page_str(o, ">English</a></nav>\n<h1>");
    ngx_http_civicgate_page_cstr(o, t->title);
    ngx_http_civicgate_page_str(o, "</h1>\n</header>\n<main id=\"main\">\n");
}


/* the status document's services, as the script renders them too */

static void
ngx_http_civicgate_page_status(ngx_http_civicgate_page_out_t *o,
    const ngx_http_civicgate_page_text_t *t, json_t *doc)
{
    size_t   i;
    json_t  *list;

    ngx_http_civicgate_page_str(o, "<section aria-labelledby=\"h-services\">"
                                "\n<p>");
    ngx_http_civicgate_page_cstr(o, t->overall);
    ngx_http_civicgate_page_str(o, " <span id=\"overall-state\">");
    ngx_http_civicgate_page_badge(o, t, json_object_get(doc, "overall"));
    ngx_http_civicgate_page_str(o, "</span></p>\n<p class=\"when\">");
    ngx_http_civicgate_page_cstr(o, t->updated);
    ngx_http_civicgate_page_str(o, " <span id=\"updated-at\">");
    ngx_http_civicgate_page_time(o, json_object_get(doc, "updated_at"));
    ngx_http_civicgate_page_str(o, "</span></p>\n<p id=\"stale\" "
                                "class=\"stale\"");

    if (doc != NULL && json_is_false(json_object_get(doc, "stale"))) {
        ngx_http_civicgate_page_str(o, " hidden");
    }

    ngx_http_civicgate_page_str(o, ">");
    ngx_http_civicgate_page_cstr(o, t->stale);
    ngx_http_civicgate_page_str(o, "</p>\n<h2 id=\"h-services\">");
    ngx_http_civicgate_page_cstr(o, t->services);
    ngx_http_civicgate_page_str(o, "</h2>\n<ul id=\"services\" "
                                "class=\"svc\">\n");

    list = json_object_get(doc, "services");

    for (i = 0; i < json_array_size(list); i++) {
        ngx_http_civicgate_page_service(o, t, json_array_get(list, i));
    }

    ngx_http_civicgate_page_str(o, "</ul>\n<p id=\"live\" class=\"live\" "
                                "role=\"status\" aria-live=\"polite\"></p>\n"
                                "<p id=\"conn\" class=\"conn\">");
    ngx_http_civicgate_page_cstr(o, t->still);
    ngx_http_civicgate_page_str(o, "</p>\n</section>\n");
}


static void
ngx_http_civicgate_page_service(ngx_http_civicgate_page_out_t *o,
    const ngx_http_civicgate_page_text_t *t, json_t *s)
{
    json_t  *msg, *since, *until;

    ngx_http_civicgate_page_str(o, "<li data-name=\"");
    ngx_http_civicgate_page_json(o, json_object_get(s, "name"));
    ngx_http_civicgate_page_str(o, "\"><h3>");
    ngx_http_civicgate_page_json(o, json_object_get(s, "name"));
    ngx_http_civicgate_page_str(o, "</h3><p>");
    ngx_http_civicgate_page_badge(o, t, json_object_get(s, "state"));
    ngx_http_civicgate_page_str(o, "</p>");

    msg = json_object_get(s, "message");

    if (json_is_string(msg) && json_string_length(msg)) {
        ngx_http_civicgate_page_str(o, "<p class=\"msg\">");
        ngx_http_civicgate_page_json(o, msg);
        ngx_http_civicgate_page_str(o, "</p>");
    }

    since = json_object_get(s, "since");
    until = json_object_get(s, "until");

    if (json_is_string(since) || json_is_string(until)) {
        ngx_http_civicgate_page_str(o, "<p class=\"when\">");

        if (json_is_string(since)) {
            ngx_http_civicgate_page_cstr(o, t->since);
            ngx_http_civicgate_page_str(o, " ");
            ngx_http_civicgate_page_time(o, since);
        }

        if (json_is_string(until)) {
            if (json_is_string(since)) {
                ngx_http_civicgate_page_str(o, "; ");
            }

            ngx_http_civicgate_page_cstr(o, t->until);
            ngx_http_civicgate_page_str(o, " ");
            ngx_http_civicgate_page_time(o, until);
        }

        ngx_http_civicgate_page_str(o, "</p>");
    }

    ngx_http_civicgate_page_str(o, "</li>\n");
}


/* a state in words, in the colour of its class; unknown for anything else */

static void
ngx_http_civicgate_page_badge(ngx_http_civicgate_page_out_t *o,
    const ngx_http_civicgate_page_text_t *t, json_t *state)
{
    ngx_uint_t   i;
    const char  *s;

    s = json_string_value(state);

    for (i = 0; i < NGX_HTTP_CIVICGATE_PAGE_STATES - 1; i++) {
        if (s != NULL && ngx_strcmp(s, ngx_http_civicgate_page_states[i]) == 0)
        {
            break;
        }
    }

    ngx_http_civicgate_page_str(o, "<span class=\"badge s-");
    ngx_http_civicgate_page_cstr(o, ngx_http_civicgate_page_states[i]);
    ngx_http_civicgate_page_str(o, "\">");
    ngx_http_civicgate_page_cstr(o, t->states[i]);
    ngx_http_civicgate_page_str(o, "</span>");
}


/* "2026-11-29T23:51:02.610Z" as "2026-11-29 23:51 UTC", as the script does */

static void
ngx_http_civicgate_page_time(ngx_http_civicgate_page_out_t *o, json_t *time)
{
    size_t        len;
    const u_char  *s;

    s = (const u_char *) json_string_value(time);
    if (s == NULL) {
        return;
    }

    len = json_string_length(time);

    ngx_http_civicgate_page_str(o, "<time datetime=\"");
    ngx_http_civicgate_page_text(o, s, len);
    ngx_http_civicgate_page_str(o, "\">");

    if (len >= 16 && s[10] == 'T') {
        ngx_http_civicgate_page_text(o, s, 10);
        ngx_http_civicgate_page_str(o, " ");
        ngx_http_civicgate_page_text(o, s + 11, 5);
        ngx_http_civicgate_page_str(o, " UTC");

    } else {
        ngx_http_civicgate_page_text(o, s, len);
    }

    ngx_http_civicgate_page_str(o, "</time>");
}


/*
 * Without the script, a code is checked by following the link to the
 * notice endpoint; with it, the script asks the endpoint and says here
 * whether the notice is official.
 */

static void
ngx_http_civicgate_page_notice(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    ngx_http_civicgate_page_ask_t *ask)
{
    const ngx_http_civicgate_page_text_t  *t;

    t = &ngx_http_civicgate_page_texts[ask->lang];

    ngx_http_civicgate_page_str(o, "<section aria-labelledby=\"h-notice\">\n"
                                "<h2 id=\"h-notice\">");
    ngx_http_civicgate_page_cstr(o, t->notice_title);
    ngx_http_civicgate_page_str(o, "</h2>\n<p>");
    ngx_http_civicgate_page_cstr(o, t->notice_intro);
    ngx_http_civicgate_page_str(o, "</p>\n");
    ngx_http_civicgate_page_form(o, ask, "notice", t->notice_label,
                                 ask->notice.data, ask->notice.len);
    ngx_http_civicgate_page_str(o, "<div id=\"notice-result\" "
                                "role=\"status\" aria-live=\"polite\"");

    if (ask->notice.len == 0) {
        ngx_http_civicgate_page_str(o, "></div>\n</section>\n");
        return;
    }

    if (!ask->notice_code) {
        ngx_http_civicgate_page_str(o, " class=\"result bad\"><strong>");
        ngx_http_civicgate_page_cstr(o, t->notice_fake);
        ngx_http_civicgate_page_str(o, "</strong></div>\n</section>\n");
        return;
    }

    ngx_http_civicgate_page_str(o, " class=\"result\">");
    ngx_http_civicgate_page_cstr(o, t->notice_link);
    ngx_http_civicgate_page_str(o, " <a href=\"");
    ngx_http_civicgate_page_text(o, plcf->status.data, plcf->status.len);
    ngx_http_civicgate_page_str(o, "notices/");
    ngx_http_civicgate_page_text(o, ask->notice.data, ask->notice.len);
    ngx_http_civicgate_page_str(o, "\">");
    ngx_http_civicgate_page_text(o, ask->notice.data, ask->notice.len);
    ngx_http_civicgate_page_str(o, "</a></div>\n</section>\n");
}


/* a journey's timeline: linked without the script, shown with it */

static void
ngx_http_civicgate_page_journeys(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    ngx_http_civicgate_page_ask_t *ask)
{
    const ngx_http_civicgate_page_text_t  *t;

    t = &ngx_http_civicgate_page_texts[ask->lang];

    ngx_http_civicgate_page_str(o, "<section aria-labelledby=\"h-journey\">\n"
                                "<h2 id=\"h-journey\">");
    ngx_http_civicgate_page_cstr(o, t->journey_title);
    ngx_http_civicgate_page_str(o, "</h2>\n<p>");
    ngx_http_civicgate_page_cstr(o, t->journey_intro);
    ngx_http_civicgate_page_str(o, "</p>\n");

    if (ask->jid_valid) {
        ngx_http_civicgate_page_form(o, ask, "journey", t->journey_label,
                                     ask->jid, NGX_HTTP_CIVICGATE_JID_LEN);
    } else {
        ngx_http_civicgate_page_form(o, ask, "journey", t->journey_label,
                                     ask->journey.data, ask->journey.len);
    }

    ngx_http_civicgate_page_str(o, "<div id=\"journey-result\" "
                                "role=\"status\" aria-live=\"polite\"");

    if (ask->jid_valid) {
        ngx_http_civicgate_page_str(o, " class=\"result\">");
        ngx_http_civicgate_page_cstr(o, t->journey_link);
        ngx_http_civicgate_page_str(o, " <a href=\"");
        ngx_http_civicgate_page_text(o, plcf->status.data, plcf->status.len);
        ngx_http_civicgate_page_str(o, "journeys/");
        ngx_http_civicgate_page_raw(o, ask->jid, NGX_HTTP_CIVICGATE_JID_LEN);
        ngx_http_civicgate_page_str(o, "\">");
        ngx_http_civicgate_page_raw(o, ask->jid, NGX_HTTP_CIVICGATE_JID_LEN);
        ngx_http_civicgate_page_str(o, "</a>");

    } else if (ask->journey.len) {
        /* the endpoint's answer: malformed, forged and unknown alike */
        ngx_http_civicgate_page_str(o, " class=\"result bad\">");
        ngx_http_civicgate_page_cstr(o, t->journey_none);

    } else {
        ngx_http_civicgate_page_str(o, ">");
    }

    ngx_http_civicgate_page_str(o, "</div>\n</section>\n");
}


/* the data-use part stays hidden until its endpoint answers the script */

static void
ngx_http_civicgate_page_tail(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_loc_conf_t *plcf,
    const ngx_http_civicgate_page_text_t *t)
{
    if (plcf->uses.len) {
        ngx_http_civicgate_page_str(o, "<section id=\"uses\" hidden "
                                    "aria-labelledby=\"h-uses\">\n"
                                    "<h2 id=\"h-uses\">");
        ngx_http_civicgate_page_cstr(o, t->uses_title);
        ngx_http_civicgate_page_str(o, "</h2>\n<p>");
        ngx_http_civicgate_page_cstr(o, t->uses_intro);
        ngx_http_civicgate_page_str(o, "</p>\n<ul id=\"uses-list\"></ul>\n"
                                    "</section>\n");
    }

    ngx_http_civicgate_page_str(o, "</main>\n<footer>\n<p class=\"note\">");
    ngx_http_civicgate_page_cstr(o, t->data);
    ngx_http_civicgate_page_str(o, " <a href=\"");
    ngx_http_civicgate_page_text(o, plcf->status.data, plcf->status.len);
    ngx_http_civicgate_page_str(o, "?lang=");
    ngx_http_civicgate_page_cstr(o, t->lang);
    ngx_http_civicgate_page_str(o, "\">JSON</a></p>\n</footer>\n<script>");
    ngx_http_civicgate_page_cstr(o, ngx_http_civicgate_page_js);
    ngx_http_civicgate_page_str(o, "</script>\n</body>\n</html>\n");
}


/* a GET form to the page itself, in the page's language */

static void
ngx_http_civicgate_page_form(ngx_http_civicgate_page_out_t *o,
    ngx_http_civicgate_page_ask_t *ask, const char *name, const char *label,
    u_char *value, size_t len)
{
    const ngx_http_civicgate_page_text_t  *t;

    t = &ngx_http_civicgate_page_texts[ask->lang];

    ngx_http_civicgate_page_str(o, "<form id=\"");
    ngx_http_civicgate_page_cstr(o, name);
    ngx_http_civicgate_page_str(o, "-form\" method=\"get\">"
                                "<input type=\"hidden\" name=\"lang\" "
                                "value=\"");
    ngx_http_civicgate_page_cstr(o, t->lang);
    ngx_http_civicgate_page_str(o, "\"><label for=\"");
    ngx_http_civicgate_page_cstr(o, name);
    ngx_http_civicgate_page_str(o, "\">");
    ngx_http_civicgate_page_cstr(o, label);
    ngx_http_civicgate_page_str(o, "</label><input id=\"");
    ngx_http_civicgate_page_cstr(o, name);
    ngx_http_civicgate_page_str(o, "\" name=\"");
    ngx_http_civicgate_page_cstr(o, name);
    ngx_http_civicgate_page_str(o, "\" maxlength=\"64\" autocomplete=\"off\" "
                                "spellcheck=\"false\" value=\"");
    ngx_http_civicgate_page_text(o, value, len);
    ngx_http_civicgate_page_str(o, "\"><button type=\"submit\">");
    ngx_http_civicgate_page_cstr(o, t->check);
    ngx_http_civicgate_page_str(o, "</button></form>\n");
}


/* a copy into the page, in buffers of the request pool */

static void
ngx_http_civicgate_page_raw(ngx_http_civicgate_page_out_t *o,
    const u_char *p, size_t len)
{
    size_t        n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    while (len && !o->error) {

        if (o->buf == NULL || o->buf->last == o->buf->end) {
            b = ngx_create_temp_buf(o->request->pool,
                                    NGX_HTTP_CIVICGATE_PAGE_BUF);
            cl = ngx_alloc_chain_link(o->request->pool);

            if (b == NULL || cl == NULL) {
                o->error = 1;
                return;
            }

            cl->buf = b;
            cl->next = NULL;
            *o->last = cl;
            o->last = &cl->next;
            o->buf = b;
        }

        n = ngx_min(len, (size_t) (o->buf->end - o->buf->last));
        o->buf->last = ngx_cpymem(o->buf->last, p, n);
        o->len += n;
        p += n;
        len -= n;
    }
}


static void
ngx_http_civicgate_page_cstr(ngx_http_civicgate_page_out_t *o,
    const char *s)
{
    ngx_http_civicgate_page_raw(o, (const u_char *) s, ngx_strlen(s));
}


/* text or an attribute value: nothing in it can open markup or a quote */

static void
ngx_http_civicgate_page_text(ngx_http_civicgate_page_out_t *o,
    const u_char *p, size_t len)
{
    const char    *ent;
    const u_char  *start, *end;

    start = p;
    end = p + len;

    for ( /* void */ ; p < end; p++) {

        switch (*p) {

        case '&':
            ent = "&amp;";
            break;

        case '<':
            ent = "&lt;";
            break;

        case '>':
            ent = "&gt;";
            break;

        case '"':
            ent = "&quot;";
            break;

        case '\'':
            ent = "&#39;";
            break;

        default:
            /* control characters are not allowed in HTML: U+FFFD */
            if ((*p < 0x20 && *p != '\t' && *p != '\n') || *p == 0x7f) {
                ent = "\xef\xbf\xbd";
                break;
            }

            continue;
        }

        ngx_http_civicgate_page_raw(o, start, p - start);
        ngx_http_civicgate_page_cstr(o, ent);
        start = p + 1;
    }

    ngx_http_civicgate_page_raw(o, start, end - start);
}


static void
ngx_http_civicgate_page_json(ngx_http_civicgate_page_out_t *o, json_t *v)
{
    if (json_is_string(v)) {
        ngx_http_civicgate_page_text(o, (const u_char *) json_string_value(v),
                                     json_string_length(v));
    }
}
