// The review desk page: open reviews, one review's items, approve / adjust / reject.
// Vanilla JS, no build step. Data only through the gateway's API with the reviewer's bearer
// token (kept in sessionStorage: this tab only). Money: integer fen from the API, shown in yuan
// with two decimals; amounts typed in yuan are parsed as decimal strings into integer fen
// (never through floating point). Every text from the API is set with textContent.
"use strict";

(function () {
  const TOKEN_KEY = "xsettle.desk.token";
  const NAME_KEY = "xsettle.desk.reviewer";
  const REFRESH_MS = 30000;
  const CLASS_NAMES = { A: "甲类 A", B: "乙类 B", SELF_PAY: "自费 self-pay" };
  const DECISION_NAMES = { APPROVED: "通过 APPROVED", PARTIAL: "部分核准 PARTIAL",
                           REJECTED: "拒付 REJECTED" };
  const VISIT_NAMES = { INPATIENT: "住院 inpatient", OUTPATIENT: "门诊 outpatient",
                        CHRONIC_OUTPATIENT: "门诊慢特病 chronic", PHARMACY: "购药 pharmacy" };

  const $ = (id) => document.getElementById(id);
  let current = null; // the review shown (API shape), or null
  let refresher = null;

  // --- money -------------------------------------------------------------------------------
  /** Integer fen as a yuan string with two decimals and thousands separators: -1,250.00. */
  function fenToYuan(fen) {
    const sign = fen < 0 ? "-" : "";
    const abs = Math.abs(fen);
    const whole = Math.floor(abs / 100).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    const cents = String(abs % 100).padStart(2, "0");
    return sign + whole + "." + cents;
  }

  /** A yuan amount typed by a person ("8000", "8,000.5", "8000.29") as integer fen, parsed
   * from its digits (no float rounding); null when it is not a non-negative amount with at
   * most two decimals. */
  function yuanToFen(text) {
    const s = String(text).trim().replace(/[,\s]/g, "").replace(/^[¥￥]/, "");
    const m = /^(\d{1,13})(?:\.(\d{0,2}))?$/.exec(s);
    if (m === null) return null;
    const fen = Number(m[1]) * 100 + Number((m[2] || "").padEnd(2, "0"));
    return Number.isSafeInteger(fen) ? fen : null;
  }
  window.deskMoney = { fenToYuan, yuanToFen };

  // --- small helpers -----------------------------------------------------------------------
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
           `${p(d.getHours())}:${p(d.getMinutes())}`;
  }

  function facts(target, pairs) {
    target.replaceChildren();
    for (const [label, value] of pairs) {
      target.append(el("dt", label), el("dd", value));
    }
  }

  function showError(message) {
    const box = $("error");
    if (!message) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    const line = String(message).replace(/\s+/g, " ").trim();
    box.textContent = line;
    box.title = line;
    box.hidden = false;
  }

  class DeskError extends Error {}

  function problemLine(status, statusText, body) {
    if (body && typeof body === "object" && typeof body.detail === "string") {
      return `${status} ${body.title || statusText}: ${body.detail}`;
    }
    return `${status} ${statusText || "error"}`;
  }

  // --- sign-in -----------------------------------------------------------------------------
  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
  function reviewer() { return sessionStorage.getItem(NAME_KEY) || ""; }

  function showSignin() {
    if (refresher !== null) { clearInterval(refresher); refresher = null; }
    $("desk").hidden = true;
    $("sign-out").hidden = true;
    $("who").textContent = "";
    $("signin").hidden = false;
    $("reviewer-name").value = reviewer();
    $("token").value = "";
    $("token").focus();
  }

  function showDesk() {
    $("signin").hidden = true;
    $("desk").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = `审核人 reviewer: ${reviewer()}`;
    if (refresher === null) refresher = setInterval(() => loadQueue(true), REFRESH_MS);
    loadQueue(false);
  }

  // --- the API -----------------------------------------------------------------------------
  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + token(), Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, { method, headers,
                                 body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (exc) {
      throw new DeskError("网络错误 network error: " + exc.message);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      if (resp.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        showSignin();
      }
      throw new DeskError(problemLine(resp.status, resp.statusText, data));
    }
    return data;
  }

  async function guarded(work) {
    try {
      await work();
    } catch (exc) {
      showError(exc instanceof DeskError ? exc.message : "出错 error: " + exc);
    }
  }

  // --- the queue ---------------------------------------------------------------------------
  async function loadQueue(quiet) {
    await guarded(async () => {
      const data = await api("GET", "v1/reviews?limit=200");
      renderQueue(data);
      if (!quiet) showError(null);
    });
  }

  function renderQueue(data) {
    $("count-open").textContent = `${data.count_open} 件待审 open`;
    const rows = $("review-rows");
    rows.replaceChildren();
    for (const r of data.reviews) {
      const tr = el("tr");
      tr.dataset.claimId = r.claim_id;
      if (r.overdue) tr.classList.add("overdue");
      if (current && current.claim_id === r.claim_id) tr.classList.add("selected");
      tr.append(
        el("td", r.claim_id, "mono"),
        el("td", r.person, "mono"),
        el("td", `${r.host_name} ${r.host}`),
        el("td", r.total_yuan, "num"),
        el("td", r.advance_yuan, "num"),
        el("td", r.proposal.fund_yuan, "num"),
        el("td", r.proposal.personal_yuan, "num"),
      );
      const due = el("td", when(r.expected_by));
      if (r.overdue) due.append(" ", el("span", "已逾期 overdue", "badge late"));
      tr.append(due, el("td", when(r.due_at)));
      const open = el("button", "审核 Review", "plain open");
      open.type = "button";
      open.addEventListener("click", () => openReview(r.claim_id));
      const cell = el("td");
      cell.append(open);
      tr.append(cell);
      rows.append(tr);
    }
    $("queue-empty").hidden = data.reviews.length > 0;
  }

  // --- one review --------------------------------------------------------------------------
  async function openReview(claimId) {
    await guarded(async () => {
      const r = await api("GET", "v1/reviews/" + encodeURIComponent(claimId));
      showError(null);
      renderReview(r);
    });
  }

  function renderReview(r) {
    current = r;
    for (const tr of $("review-rows").children) {
      tr.classList.toggle("selected", tr.dataset.claimId === r.claim_id);
    }
    $("review").hidden = false;
    $("review-claim").textContent = r.claim_id;
    $("review-state").textContent = r.state === "OPEN" ? "待审核 OPEN" : "已审核 DECIDED";
    const hospital = r.hospital.name ? `${r.hospital.name} (${r.hospital.code})` : r.hospital.code;
    facts($("review-facts"), [
      ["参保人 person", r.person],
      ["就医地 host", `${r.host_name} ${r.host}`],
      ["医院 hospital", `${hospital} · ${r.hospital.level} 级`],
      ["类型 visit", VISIT_NAMES[r.visit_type] || r.visit_type],
      ["入院 admitted", when(r.admitted_at)],
      ["出院 discharged", when(r.discharged_at)],
      ["诊断 diagnoses", r.diagnoses.join(", ")],
      ["受理 accepted", when(r.accepted_at)],
      ["总额 total", r.total_yuan + " 元"],
      ["已预付 advance", r.advance_yuan + " 元"],
      ["应答期限 expected by", when(r.expected_by) + (r.overdue ? " 已逾期 overdue" : "")],
      ["截止 deadline", when(r.due_at)],
    ]);
    const p = r.proposal;
    facts($("review-proposal"), [
      ["结论 decision", DECISION_NAMES[p.decision] || p.decision],
      ["可报销 eligible", p.eligible_yuan + " 元"],
      ["基金支付 fund", p.fund_yuan + " 元"],
      ["大病保险 critical illness", p.critical_illness_yuan + " 元"],
      ["医疗救助 assistance", p.assistance_yuan + " 元"],
      ["个人负担 personal", p.personal_yuan + " 元"],
      ["补缴/退还 balance", balanceText(p.balance_fen)],
    ]);
    renderItems(r);
    const open = r.state === "OPEN";
    for (const id of ["approve", "adjust", "reject", "reject-reason"]) $(id).disabled = !open;
    $("reject-reason").value = "";
    if (r.result) showResult(r.result, r.reviewer);
    else $("result").hidden = true;
  }

  function renderItems(r) {
    const rows = $("item-rows");
    rows.replaceChildren();
    const open = r.state === "OPEN";
    r.items.forEach((item) => {
      const tr = el("tr");
      tr.dataset.itemCode = item.item_code;
      const reason = [item.reason_code, item.note].filter(Boolean).join(" · ");
      tr.append(
        el("td", item.item_code, "mono"),
        el("td", item.item_name, "wrap"),
        el("td", CLASS_NAMES[item.catalogue_class] || item.catalogue_class),
        el("td", item.amount_yuan, "num"),
        el("td", item.proposed_yuan, "num"),
        el("td", reason, "wrap"),
      );
      const amount = el("input", undefined, "amount");
      amount.type = "text";
      amount.inputMode = "decimal";
      amount.name = "approved";
      amount.value = item.proposed_yuan;
      amount.disabled = !open;
      amount.setAttribute("aria-label", `${item.item_code} 核准金额 approved yuan`);
      const code = el("input", undefined, "code");
      code.type = "text";
      code.name = "reason_code";
      code.maxLength = 64;
      code.setAttribute("list", "reason-codes");
      code.placeholder = "原因代码 code";
      code.disabled = !open;
      const note = el("input", undefined, "note");
      note.type = "text";
      note.name = "note";
      note.maxLength = 500;
      note.placeholder = "说明 note";
      note.disabled = !open;
      amount.addEventListener("input", () => markRow(tr, item));
      const cells = [amount, code, note].map((input) => {
        const td = el("td", undefined, input === amount ? "num" : "");
        td.append(input);
        return td;
      });
      tr.append(...cells);
      rows.append(tr);
    });
  }

  function markRow(tr, item) {
    const input = tr.querySelector("input[name=approved]");
    const fen = yuanToFen(input.value);
    const bad = fen === null || fen > item.amount_fen;
    input.classList.toggle("invalid", bad);
    tr.classList.toggle("changed", !bad && fen !== item.proposed_fen);
  }

  function balanceText(balanceFen) {
    if (balanceFen > 0) return `患者补缴 top-up ${fenToYuan(balanceFen)} 元`;
    if (balanceFen < 0) return `退还患者 refund ${fenToYuan(-balanceFen)} 元`;
    return "无需补退 nothing to settle (0.00 元)";
  }

  /** The adjustments typed in the items table: the rows whose approved amount differs from
   * the proposal. Throws DeskError naming the first bad row. */
  function adjustments() {
    const out = [];
    const rows = Array.from($("item-rows").children);
    rows.forEach((tr, n) => {
      const item = current.items[n];
      const text = tr.querySelector("input[name=approved]").value;
      const fen = yuanToFen(text);
      if (fen === null) {
        throw new DeskError(`${item.item_code} 核准金额无效 invalid amount "${text}": ` +
                            "元, 最多两位小数 at most two decimals");
      }
      if (fen > item.amount_fen) {
        throw new DeskError(`${item.item_code} 核准金额 ${fenToYuan(fen)} 元 超过金额 ` +
                            `exceeds billed ${item.amount_yuan} 元`);
      }
      if (fen === item.proposed_fen) return;
      const code = tr.querySelector("input[name=reason_code]").value.trim();
      if (!code) {
        throw new DeskError(`${item.item_code} 需要原因代码 a reason code is required`);
      }
      const note = tr.querySelector("input[name=note]").value.trim();
      out.push({ item_code: item.item_code, approved_fen: fen, reason_code: code, note,
                 item_name: item.item_name, amount_fen: item.amount_fen });
    });
    if (out.length === 0) {
      throw new DeskError("没有调整任何项目 no item changed: edit an approved amount " +
                          "(or approve the proposal)");
    }
    return out;
  }

  // --- confirmation ------------------------------------------------------------------------
  function confirmDialog(title, lines) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    const list = el("ul");
    for (const line of lines) list.append(el("li", line));
    $("confirm-text").replaceChildren(list);
    return new Promise((resolve) => {
      const done = (answer) => {
        $("confirm-yes").onclick = null;
        $("confirm-no").onclick = null;
        dialog.oncancel = null;
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      $("confirm-yes").onclick = () => done(true);
      $("confirm-no").onclick = () => done(false);
      dialog.oncancel = (event) => { event.preventDefault(); done(false); };
      dialog.showModal();
    });
  }

  // --- decisions ---------------------------------------------------------------------------
  async function decide(body, title, lines) {
    if (current === null || current.state !== "OPEN") return;
    if (!(await confirmDialog(title, lines))) return;
    const claimId = current.claim_id;
    const buttons = ["approve", "adjust", "reject"].map($);
    buttons.forEach((b) => { b.disabled = true; });
    let decided = false;
    await guarded(async () => {
      const result = await api(
        "POST", "v1/reviews/" + encodeURIComponent(claimId) + "/decision",
        { ...body, reviewer: reviewer() });
      decided = true;
      showError(null);
      current = { ...current, state: "DECIDED", result, reviewer: result.reviewer };
      $("review-state").textContent = "已审核 DECIDED";
      for (const input of $("item-rows").querySelectorAll("input")) input.disabled = true;
      $("reject-reason").disabled = true;
      showResult(result, result.reviewer);
    });
    if (!decided) {
      buttons.forEach((b) => { b.disabled = false; });
      // Show the review as it stands now (decided by someone else: 409), keeping the error.
      try {
        const now = await api("GET", "v1/reviews/" + encodeURIComponent(claimId));
        if (current !== null && current.claim_id === claimId && now.state !== "OPEN") {
          renderReview(now);
        }
      } catch (_) { /* the error line already says what went wrong */ }
    }
    await loadQueue(true);
  }

  function showResult(result, by) {
    const box = $("result");
    box.dataset.decision = result.decision;
    box.replaceChildren(
      el("div", `审核完成 decided: ${DECISION_NAMES[result.decision] || result.decision}` +
                (by ? ` · 审核人 ${by}` : "")),
    );
    const line = el("div");
    const fund = el("strong", `基金支付 fund pays ${result.fund_yuan} 元`);
    fund.id = "result-fund";
    const settle = el("strong", balanceText(result.balance_fen));
    settle.id = "result-balance";
    line.append(fund, " · ", `个人负担 personal ${result.personal_yuan} 元 · ` +
                `已预付 advance ${result.advance_yuan} 元 · `, settle);
    box.append(line);
    if (result.adjustments && result.adjustments.length) {
      const list = el("ul");
      for (const a of result.adjustments) {
        list.append(el("li", `${a.item_code}: 核准 approved ${a.approved_yuan} 元 ` +
                              `(${a.reason_code}${a.note ? " · " + a.note : ""})`));
      }
      box.append(list);
    }
    box.hidden = false;
  }

  function onApprove() {
    const p = current.proposal;
    decide({ action: "approve" }, "确认通过 Approve?", [
      `结算单 claim ${current.claim_id}`,
      `基金支付(拟) fund ${p.fund_yuan} 元 · 个人负担 personal ${p.personal_yuan} 元`,
      balanceText(p.balance_fen),
    ]);
  }

  function onAdjust() {
    let given;
    try {
      given = adjustments();
    } catch (exc) {
      showError(exc.message);
      return;
    }
    showError(null);
    const lines = [`结算单 claim ${current.claim_id}: 调整 ${given.length} 项 items`];
    for (const a of given) {
      lines.push(`${a.item_code} ${a.item_name}: ${fenToYuan(a.amount_fen)} → ` +
                 `${fenToYuan(a.approved_fen)} 元 (${a.reason_code})`);
    }
    decide({ action: "adjust",
             adjustments: given.map(({ item_code, approved_fen, reason_code, note }) =>
               ({ item_code, approved_fen, reason_code, note })) },
           "确认调整 Adjust?", lines);
  }

  function onReject() {
    const reason = $("reject-reason").value.trim();
    if (!reason) {
      showError("拒付需要原因 a rejection needs a reason");
      $("reject-reason").focus();
      return;
    }
    showError(null);
    decide({ action: "reject", reason }, "确认拒付 Reject?", [
      `结算单 claim ${current.claim_id}`,
      `原因 reason: ${reason}`,
      `基金不支付，患者全额自付 the fund pays nothing; the patient pays ${current.total_yuan} 元`,
    ]);
  }

  // --- wiring ------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const t = $("token").value.trim();
      const name = $("reviewer-name").value.trim();
      if (!t || !name) {
        showError("请填写令牌和姓名 token and name are required");
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, t);
      sessionStorage.setItem(NAME_KEY, name.slice(0, 64));
      showError(null);
      showDesk();
    });
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      current = null;
      $("review").hidden = true;
      showSignin();
    });
    $("refresh").addEventListener("click", () => loadQueue(false));
    $("close-review").addEventListener("click", () => {
      current = null;
      $("review").hidden = true;
      for (const tr of $("review-rows").children) tr.classList.remove("selected");
    });
    $("approve").addEventListener("click", onApprove);
    $("adjust").addEventListener("click", onAdjust);
    $("reject").addEventListener("click", onReject);
    if (token() && reviewer()) showDesk();
    else showSignin();
  });
})();
